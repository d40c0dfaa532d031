"""Fault injection for tests/faults: loaded by every Python process of a launched run (this
folder is put first on PYTHONPATH), it does nothing unless $KONTRAST_FAULT_DIR is set.

Rank 0 (the process that writes checkpoints) can be held at a point of the run so that a test
delivers its fault there, on a condition rather than after a guessed sleep:

KONTRAST_FAULT_PAUSE_SAVE=N   the N-th resumable checkpoint (step_*.pt) rank 0 writes stops
                              after its bytes are in the temporary file, before the rename
                              (file ``paused-save`` appears; mid-save)
KONTRAST_FAULT_PAUSE_STEP=N   optimizer step N stops with its batches loaded, before the
                              forward pass (file ``paused-step``; mid-step: the other rank
                              waits in the step's gradient all-reduce)
KONTRAST_FAULT_PAUSE_EVAL=N   the N-th evaluation stops before it starts encoding
                              (file ``paused-eval`` appears; mid-evaluation; the starting
                              model's evaluation is the first)

The process waits until the test creates ``release`` in the folder (or kills it).

KONTRAST_FAULT_CONSTANTS=module:NAME=VALUE;...   sets module constants (float) when the
                              module is imported: a test's monkeypatch, in every process
                              (e.g. a short image fetch deadline)
"""

import os
import sys
import time

_DIR = os.environ.get("KONTRAST_FAULT_DIR")


def _pause(point: str) -> None:
    marker = os.path.join(_DIR, f"paused-{point}")
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    release = os.path.join(_DIR, "release")
    while not os.path.exists(release):
        time.sleep(0.05)   # Python code between sleeps: a SIGTERM handler runs here


def _counting(env: str, point: str, target):
    wanted = int(os.environ.get(env) or 0)
    calls = [0]

    def wrapper(*args, **kwargs):
        if wanted and os.environ.get("RANK", "0") == "0":
            calls[0] += 1
            if calls[0] == wanted:
                return target(*args, pause=lambda: _pause(point), **kwargs)
        return target(*args, pause=None, **kwargs)
    return wrapper


def _install() -> None:
    import importlib.abc
    import importlib.util

    patches = {
        "kontrast.trainer.storage": [_patch_storage],
        "kontrast.trainer.evaluation.evaluate": [_patch_evaluate],
        "kontrast.trainer.step.train_step": [_patch_train_step],
    }
    for item in filter(None, os.environ.get("KONTRAST_FAULT_CONSTANTS", "").split(";")):
        module, assignment = item.split(":")
        name, value = assignment.split("=")
        number = float(value)
        number = int(number) if number.is_integer() else number
        patches.setdefault(module, []).append(lambda m, name=name, number=number: setattr(m, name, number))

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in patches:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            loader = spec.loader
            exec_module = loader.exec_module

            def patched_exec(module):
                exec_module(module)
                for patch in patches[name]:
                    patch(module)
            loader.exec_module = patched_exec
            return spec

    sys.meta_path.insert(0, Finder())


def _patch_storage(storage) -> None:
    original = storage.write_atomic

    def write_atomic(location, write, *, pause=None, **kwargs):
        if pause is None or not os.path.basename(str(location)).startswith("step_"):
            return original(location, write, **kwargs)

        def write_then_pause(f):
            write(f)
            f.flush()
            pause()
        return original(location, write_then_pause, **kwargs)

    counted = _counting("KONTRAST_FAULT_PAUSE_SAVE", "save", write_atomic)

    def only_checkpoints(location, write, **kwargs):
        if os.path.basename(str(location)).startswith("step_"):
            return counted(location, write, **kwargs)
        return original(location, write, **kwargs)
    storage.write_atomic = only_checkpoints


def _pause_before(attribute: str, env: str, point: str):
    """A patch holding rank 0 when it calls ``module.<attribute>`` the N-th time."""
    def patch(module) -> None:
        original = getattr(module, attribute)

        def held(*args, pause=None, **kwargs):
            if pause is not None:
                pause()
            return original(*args, **kwargs)
        setattr(module, attribute, _counting(env, point, held))
    return patch


_patch_evaluate = _pause_before("evaluate", "KONTRAST_FAULT_PAUSE_EVAL", "eval")
_patch_train_step = _pause_before("optimizer_step", "KONTRAST_FAULT_PAUSE_STEP", "step")


if _DIR:
    _install()
