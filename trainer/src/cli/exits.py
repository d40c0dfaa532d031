"""How the trainer's commands end: exit codes, and the message Kubernetes shows for a pod.

A permanent error (an invalid TrainJob, bad data, a parameter that cannot work) prints its
message, writes it to the termination log, and exits with ``kontrast.contract.EXIT_PERMANENT``
(78), so the operator fails the job instead of retrying. SIGTERM during training saves a
checkpoint and exits with 143, as a process killed by it would.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

from kontrast.contract import EXIT_PERMANENT, TERMINATION_LOG_ENV

from ..errors import Interrupted, PermanentError

log = logging.getLogger(__name__)

#: The exit code of a process stopped by SIGTERM (128 + 15), also after a clean save.
EXIT_INTERRUPTED = 143

#: Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LOG_LIMIT = 4096


def write_termination_log(message: str, path: Optional[str] = None) -> None:
    """Write ``message`` (cut to what Kubernetes keeps) to ``path``, by default the file named
    by $KONTRAST_TERMINATION_LOG; nothing when neither is set."""
    path = path or os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    data = message.encode("utf-8")
    if len(data) > TERMINATION_LOG_LIMIT:
        data = data[: TERMINATION_LOG_LIMIT - 3] + b"..."
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        log.warning("cannot write the termination log %s: %s", path, exc)


def run_permanent(body: Callable[[], int], prog: str) -> int:
    """Run ``body``; a permanent error prints its message, goes to the termination log and
    exits with EXIT_PERMANENT."""
    try:
        return body()
    except Interrupted as exc:
        print(f"{prog}: {exc}; running it again resumes from there", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PermanentError as exc:
        message = str(exc)
        print(f"{prog}: {message}", file=sys.stderr)
        write_termination_log(message)
        return EXIT_PERMANENT
