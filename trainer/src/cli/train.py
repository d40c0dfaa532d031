"""``kontrast train FILE`` (and ``torchrun ... -m kontrast.trainer FILE``): validate, resolve, train.

Validates the TrainJob exactly as ``kontrast validate`` does (the CRD's schema, defaults and
rules), resolves it, and trains. How it ends (exit codes, the termination log): ``exits.py``.

Example data: a TrainJob annotated ``kontrast.dev/generate-example-data: "true"`` whose
trainData (a local path) does not exist gets the synthetic data set of
``kontrast.trainer.data.example_data`` generated into trainData's folder first.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from kontrast.contract import JOB_NAME_ENV

from ..errors import SpecError
from ..locations import has_scheme
from ..spec import GENERATE_EXAMPLE_DATA, Resolved, load_resolved
from .exits import run_permanent
from .stack_dumps import print_stacks_on_sigusr1

log = logging.getLogger("kontrast.trainer")


def ensure_example_data(resolved: Resolved) -> None:
    """Generate the example data set when the TrainJob asks for it and it is missing."""
    if str(resolved.annotations.get(GENERATE_EXAMPLE_DATA, "")).lower() != "true":
        return
    params = resolved.params
    if has_scheme(params.train_data) or Path(params.train_data).exists():
        return
    from ..data.example_data import generate

    folder = Path(params.train_data).parent
    log.info("generating the example data set into %s (annotation %s)", folder, GENERATE_EXAMPLE_DATA)
    generate(folder)
    for key, location in (("trainData", params.train_data), ("evalData", params.eval_data)):
        if location and not has_scheme(location) and not Path(location).exists():
            raise SpecError(key, f"{location} does not exist; the example generator writes train.csv and "
                                 f"eval.csv into {folder}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kontrast train",
        description="Fine-tune an open_clip model from a TrainJob file (locally, or as the torchrun "
                    "entry point in a pod).")
    p.add_argument("file", help="TrainJob YAML file")
    p.add_argument("--output", help="write checkpoints and reports here instead of spec.output "
                                    "(relative to the working folder)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on the terminal")
    p.add_argument("--check", action="store_true",
                   help="validate the TrainJob and its data (every image included), then exit without training")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def _reporters(resolved: Resolved, progress: bool):
    """Sinks besides progress.jsonl (which train() always writes)."""
    from ..report.reporters import TerminalReporter

    sinks = [TerminalReporter()] if progress else []
    if os.environ.get(JOB_NAME_ENV):
        # In a cluster the operator's reporter patches the TrainJob's status.
        try:
            from ..report.cluster_status import make_reporter  # the operator work's cluster reporter
        except ImportError as exc:
            log.warning("%s is set but no cluster status reporter is available: %s", JOB_NAME_ENV, exc)
        else:
            try:
                sinks.append(make_reporter(resolved))
            except Exception as exc:  # noqa: BLE001 - reporting must never stop training
                log.warning("cannot start the cluster status reporter: %s", exc)
    return sinks


def _check(resolved: Resolved) -> None:
    """Check the data as training would. Under torchrun the processes split the images, so
    they need their process group (gloo: the check needs no GPU) to count the bad ones of
    the whole file against maxBadFraction, not each its own share."""
    params = resolved.params
    if "WORLD_SIZE" not in os.environ:   # one process: no process group, and no torch to import
        _check_data(params)
        return
    from ..distributed import init_from_env, shutdown

    init_from_env("cpu")
    try:
        _check_data(params)
    finally:
        shutdown()


def _check_data(params) -> None:
    """Each file's table is built in this process, which exits once they are checked."""
    from ..data.load import load_corpus, load_data

    load_data(params.train_data, params, require_positive_weight=True, progress=True, build_here=True)
    for eval_set in params.eval_sets:
        load_data(eval_set.data, params, require_positive_weight=False, progress=True, build_here=True)
        load_corpus(eval_set.corpus, params, progress=True, build_here=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(
        level=logging.WARNING,  # other libraries (open_clip logs a lot at INFO) stay quiet
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else
               f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kontrast").setLevel(level if rank == 0 else logging.WARNING)
    print_stacks_on_sigusr1()

    def go() -> int:
        resolved = load_resolved(args.file, args.output)
        ensure_example_data(resolved)
        if args.check:
            _check(resolved)
            print(f"{args.file}: TrainJob and data are valid")
            return 0
        from ..run.train import train

        reporters = _reporters(resolved, progress=not args.no_progress) if rank == 0 else []
        train(resolved, device=args.device, reporters=reporters)
        return 0

    return run_permanent(go, "kontrast train")
