"""``python -m kontrast.operator``: run the operator (kopf, standalone, one replica).

Watches the namespaces in $KONTRAST_WATCH_NAMESPACES (comma-separated), or all namespaces
when it is empty. Extra arguments go to ``kopf run`` (e.g. ``--verbose``). The liveness
endpoint is ``http://0.0.0.0:8080/healthz`` unless $KONTRAST_LIVENESS says otherwise.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from .config import OperatorConfig


def kopf_args(config: OperatorConfig, liveness: Optional[str], extra: Sequence[str] = ()) -> list[str]:
    args = ["run", "--standalone", "-m", "kontrast.operator.handlers"]
    if config.watch_namespaces:
        for ns in config.watch_namespaces:
            args += ["--namespace", ns]
    else:
        args.append("--all-namespaces")
    if liveness:
        args += ["--liveness", liveness]
    return [*args, *extra]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kopf import cli

    config = OperatorConfig.from_env()
    liveness = os.environ.get("KONTRAST_LIVENESS", "http://0.0.0.0:8080/healthz") or None
    args = kopf_args(config, liveness, list(sys.argv[1:] if argv is None else argv))
    return cli.main(args=args, prog_name="kontrast-operator", standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main())
