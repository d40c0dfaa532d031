"""``kontrast launch FILE``: run one node of a TrainJob under torchrun (the pods' command).

The operator renders each training pod with the torchrun contract in its environment:

====================  ==========================================================
PET_NNODES            number of nodes (pods)
PET_NPROC_PER_NODE    training processes per node
PET_NODE_RANK         this pod's completion index (downward API)
PET_MASTER_ADDR       ``<job>-0.<service>``: the index-0 pod, through the headless Service
PET_MASTER_PORT       the rendezvous port (29500)
====================  ==========================================================

and this runs ``torchrun ... -m kontrast.trainer FILE`` in-process, so it can see every local
worker's exit code. torchrun itself exits 1 whatever failed; the operator needs to know
whether the failure is permanent (bad data, bad parameters: ``EXIT_PERMANENT``), which its
podFailurePolicy turns into an immediate Failed job instead of a restart. So:

- a worker that exited with EXIT_PERMANENT -> exit EXIT_PERMANENT, and copy the trainer's
  message (workers write it to a private file) to the pod's termination log;
- another failure -> exit with that worker's code (128+N for a signal) and leave the
  termination log empty, so Kubernetes falls back to the log's tail (the traceback);
- success -> 0.

Stopping (``kubectl delete pod``, preemption): the kubelet sends SIGTERM to this process;
torchrun forwards it to every worker, which finishes its step, saves a checkpoint and exits
(run/save_policy.py), and this exits 143. torchrun would SIGKILL workers still running after its
shutdown timeout (30 s by default), so it gets ``SHUTDOWN_TIMEOUT_S`` instead: the pod's
terminationGracePeriodSeconds is the one limit on the save.

Outside a pod (no PET_* variables) it trains on one node with torchrun's standalone
rendezvous, which is handy to try the pod command locally.

A run that seems stuck: ``kill -USR1`` this process and every training process and DataLoader
worker prints its threads' stacks to the log (``stack_dumps.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from kontrast.contract import EXIT_PERMANENT, TERMINATION_LOG, TERMINATION_LOG_ENV

from .exits import EXIT_INTERRUPTED, write_termination_log
from .stack_dumps import forward_sigusr1_to_stack_printers

log = logging.getLogger("kontrast.launch")

#: torchrun's wait for workers to exit after forwarding SIGTERM, before it SIGKILLs them; longer
#: than any grace period, so the kubelet's terminationGracePeriodSeconds decides.
SHUTDOWN_TIMEOUT_S = 24 * 3600


def torchrun_args(file: str, extra: Sequence[str], env: dict) -> list[str]:
    """The torchrun command line for this node, from the PET_* environment."""
    nnodes = int(env.get("PET_NNODES") or 1)
    nproc = int(env.get("PET_NPROC_PER_NODE") or 1)
    args = ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    if nnodes == 1 and not env.get("PET_MASTER_ADDR"):
        args.append("--standalone")
    else:
        rank = env.get("PET_NODE_RANK")
        if rank in (None, ""):
            raise SystemExit("kontrast launch: PET_NODE_RANK is not set (the pod's completion index)")
        args += ["--node-rank", str(int(rank)),
                 "--master-addr", env.get("PET_MASTER_ADDR") or "127.0.0.1",
                 "--master-port", str(int(env.get("PET_MASTER_PORT") or 29500))]
    return [*args, "-m", "kontrast.trainer", file, *extra]


def exit_code_of(failures: dict) -> tuple[int, Optional[int]]:
    """(exit code for this pod, global rank that decided it) from torchrun's failures."""
    if not failures:
        return 1, None
    for rank, failure in sorted(failures.items()):
        if failure.exitcode == EXIT_PERMANENT:
            return EXIT_PERMANENT, rank
    rank, failure = sorted(failures.items())[0]
    code = failure.exitcode
    if code is None or code == 0:
        return 1, rank
    return (128 - code if code < 0 else code), rank


def exit_without_finalizing(code: int) -> NoReturn:
    """Exit with ``code`` now, flushing the logs, without finalizing the interpreter.

    On a signal torchrun leaves the rendezvous open (closing it would end the job for the other
    nodes too: torch/distributed/launcher/api.py), so its keep-alive thread goes on calling the
    store every few seconds. A call in flight while the interpreter finalizes ends its thread
    with pthread_exit on the way back into Python, and that unwinds through torch's C++ binding,
    which aborts the process ('terminate called without an active exception'): the pod would
    exit 134, not 143, after a clean save. ``os._exit`` skips finalization, and with it the race.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kontrast launch", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the TrainJob manifest (mounted at /etc/kontrast/trainjob.yaml in pods)")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="passed on to the trainer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    forward_sigusr1_to_stack_printers()

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    termination_log = os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG
    extra = [a for a in args.trainer_args if a != "--"]
    signalled = False
    with tempfile.TemporaryDirectory(prefix="kontrast-launch-") as tmp:
        # The workers write a permanent failure's message here; this process decides what the
        # pod reports (several local workers would otherwise race on one file).
        worker_log = Path(tmp) / "termination.log"
        os.environ[TERMINATION_LOG_ENV] = str(worker_log)
        argv_torchrun = torchrun_args(args.file, extra, dict(os.environ))
        log.info("torchrun %s", " ".join(argv_torchrun))
        try:
            run(parse_args(argv_torchrun))
        except ChildFailedError as exc:
            code, rank = exit_code_of(exc.failures)
            if code == EXIT_PERMANENT:
                message = worker_log.read_text(errors="replace").strip() if worker_log.exists() else ""
                write_termination_log(message or f"training process {rank} failed with a permanent error "
                                                 f"(exit code {code})", termination_log)
            log.error("training failed on this node: rank %s exited with code %s", rank, code)
            return code
        except SignalException as exc:                  # torchrun's handler of SIGTERM, SIGINT, ...
            log.error("stopped by a signal: %s", exc)
            signalled = True
        except KeyboardInterrupt:
            return 130
        except Exception:  # rendezvous timeouts
            log.exception("torchrun failed")
            return 1
    if signalled:
        exit_without_finalizing(EXIT_INTERRUPTED)       # after the temporary folder is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
