"""The node-shared table files: each data file checked once per node, memory-mapped by every process.

The checked, resolved table (texts, resolved image locations, per-row field weights, ids) is
written once per node as Arrow IPC files in the cache folder (``CacheFolder.tables``):
``KEY.arrow.texts`` holds the text columns, one record batch per block of the data file, as
the builder streams them (``build.py``); ``KEY.arrow`` holds the per-row numbers in one batch
(so each is one contiguous numpy view) and is written last, so its presence means the table
is complete. Every rank and DataLoader worker on the node then memory-maps both: the page
cache holds the table once, however many processes read it, and memory does not grow with
Python objects per row. The first process to take the file lock builds the files; the others
wait on the lock and map them (a failed build leaves no file, so each of them fails with the
same DataError).

The training table's known pairs (``step.known_pairs.KnownPairs``) are built the same way,
once per node, into ``KEY.arrow.known`` beside it (``pairs_file.shared_known_pairs``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pyarrow as pa

from .. import storage
from ..errors import DataError, DataProblem
from ..layout import CacheFolder
from ..locations import has_scheme
from .build import build_stream, joined
from .columns import Columns
from .read import read_batches

log = logging.getLogger(__name__)

#: Bumped whenever the layout of the node-shared table file changes.
TABLE_FORMAT = 3
#: The sidecar files of a table file ``KEY.arrow``: its text columns, its known pairs.
TEXTS_SUFFIX, KNOWN_SUFFIX = ".texts", ".known"
#: Data files above this size are checked in a child process (see shared_table_file).
IN_PROCESS_MAX_BYTES = 1 << 20
#: The builder process's allocators. Arrow's buffers go through glibc's malloc rather than
#: Arrow's default mimalloc, and glibc hands every freed block of 256 KiB or more back to the
#: system at once (a fixed mmap threshold: the default one rises to the largest block freed,
#: and freed blocks then stay in the heap). Each block's temporaries are given back before the
#: next block is read, so what the builder holds follows what it keeps. At 1M rows its peak
#: went from 296 to 161 MiB (1.78x the CSV) and at 10M from 873 to 740 MiB, for 1.3 s instead
#: of 1.0 and 12.5 s instead of 6.8 (page faults on the memory it maps again; BENCHMARKS.md).
BUILDER_POOL = "system"
BUILDER_MMAP_THRESHOLD = 256 << 10


def source_stamp(location: str) -> dict[str, Any]:
    """What identifies this version of a data file: size and modification time (or ETag)."""
    try:
        info = _info(location)
    except FileNotFoundError:
        raise DataError([DataProblem(location, "file not found")]) from None
    except Exception as exc:  # noqa: BLE001 - unreachable store: permanent for this run
        raise DataError([DataProblem(location, f"cannot read: {exc}")]) from None
    keep = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "md5Hash", "generation")
    return {k: str(info[k]) for k in keep if k in info}


def _info(location: str) -> dict[str, Any]:
    """fsspec's ``info`` of the file; a local file's size and mtime (what fsspec's local
    filesystem gives) straight from ``os.stat``, without importing fsspec (20 ms of a --check)."""
    if not has_scheme(location):
        status = os.stat(location)
        return {"size": status.st_size, "mtime": status.st_mtime}
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return fs.info(path)


def table_key(location: str, cols: Columns, require_positive_weight: bool) -> str:
    stamp = {"format": TABLE_FORMAT, "file": location, "source": source_stamp(location),
             "columns": cols.__dict__, "positive": require_positive_weight}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:32]


def shared_table_file(location: str, cols: Columns, cache: str, *, require_positive_weight: bool = True,
                      build_here: bool = False) -> Path:
    """The node's checked table file for ``location``: built by the first process to get the
    lock, mapped by everyone.

    A file larger than ``IN_PROCESS_MAX_BYTES`` is built in a child process, so the parsed
    blocks and their temporaries never enter a training process's heap (whose allocator would
    keep much of them); smaller ones are built in place, saving the child's start-up.
    ``build_here``: build in place whatever the size, for a process that exits once the data
    is checked (``kontrast train --check``: the child's start-up is a third of a 1M-row check).
    """
    folder = CacheFolder(cache).tables
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{table_key(location, cols, require_positive_weight)}.arrow"

    def build(target: Path) -> None:
        started = time.monotonic()
        size = int(source_stamp(location).get("size") or 0)
        where = "in this process"
        if size > IN_PROCESS_MAX_BYTES and not build_here:
            built = _build_in_child(location, cols, target, require_positive_weight)
            where = f"in a builder process that peaked at {built['peak_rss_mib']} MiB"
        else:
            build_table_file(location, cols, target, require_positive_weight)
        log.info("%s: checked and wrote the node's table file in %.1f s, %s", location, time.monotonic() - started,
                 where)

    return once_per_node(target, build)


def once_per_node(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(target)`` in the first process to take the lock of its
    table (``KEY.lock``), reused by everyone after. ``build`` publishes atomically, so a
    target that exists is complete; a builder killed mid-write leaves only temporaries, which
    the next lock holder removes."""
    key = target.name.split(".", 1)[0]
    with open(target.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            log.debug("reusing %s", target)
            return target
        storage.remove_temporaries(target.parent, target.name)
        build(target)
    return target


def known_pairs_file(table_file: str | Path, keep: Optional[np.ndarray]) -> Path:
    """Where the node keeps the known pairs of a table's rows (``keep``: the rows left after
    bad images were skipped, the same on every rank; None for all)."""
    rows = "" if keep is None else "-" + hashlib.sha256(np.ascontiguousarray(keep, np.int64)).hexdigest()[:16]
    return Path(f"{table_file}{KNOWN_SUFFIX}{rows}")


def build_table_file(location: str, cols: Columns, target: Path, require_positive_weight: bool) -> None:
    """Read, check and write the table files, streaming: each block's text columns are written
    as soon as it is checked, so the builder never holds the parsed file. Both files are
    written atomically (beside them, then renamed), the texts first: ``target`` appears last."""
    numbers: dict[str, pa.Table] = {}

    def write_texts(f) -> None:
        writer = None

        def write(texts: pa.Table) -> None:
            nonlocal writer
            writer = writer or pa.ipc.new_file(f, texts.schema)
            writer.write_table(texts)

        try:
            numbers["table"] = build_stream(location, cols, read_batches(location), write,
                                            require_positive_weight=require_positive_weight)
        finally:
            if writer is not None:
                writer.close()

    storage.write_atomic(str(texts_file(target)), write_texts, durable=False)
    table = numbers["table"]

    def write_numbers(f) -> None:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table, max_chunksize=table.num_rows)

    storage.write_atomic(str(target), write_numbers, durable=False)


def texts_file(table_file: str | Path) -> Path:
    return Path(f"{table_file}{TEXTS_SUFFIX}")


def builder_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The builder process's environment: ``environ`` with its allocators set (see
    ``BUILDER_POOL``); tunables the user gave glibc are kept, ours added after them."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "ARROW_DEFAULT_MEMORY_POOL": BUILDER_POOL,
            "GLIBC_TUNABLES": ":".join([*tunables, f"glibc.malloc.mmap_threshold={BUILDER_MMAP_THRESHOLD}"])}


def _build_in_child(location: str, cols: Columns, target: Path, require_positive_weight: bool) -> dict[str, Any]:
    """Build the table files in a child process; what it reports (``_child_main``)."""
    import subprocess

    request = json.dumps({"location": location, "columns": cols.__dict__, "target": str(target),
                          "positive": require_positive_weight})
    done = subprocess.run([sys.executable, "-m", __name__], input=request, text=True,
                          capture_output=True, env=builder_environment(os.environ))
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"building the table of {location} failed:\n{done.stderr[-4000:]}") from None
    if done.returncode == 0:
        return answer
    raise DataError([DataProblem(**p) for p in answer["problems"]], answer["truncated"])


def _child_main() -> int:
    """``python -m kontrast.trainer.data.shared_table``: build one table file (request JSON on stdin).
    Its peak RSS and Arrow's allocator come back as JSON on stdout, or a DataError with exit
    code 78."""
    from dataclasses import asdict

    request = json.loads(sys.stdin.read())
    cols = Columns(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["columns"].items()})
    try:
        build_table_file(request["location"], cols, Path(request["target"]), request["positive"])
    except DataError as exc:
        print(json.dumps({"problems": [asdict(p) for p in exc.problems], "truncated": exc.truncated}))
        return 78
    print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "memory_pool": pa.default_memory_pool().backend_name}))
    return 0


def _peak_rss_mib() -> int:
    """This process's peak RSS since it started its program (VmHWM): ``ru_maxrss`` would also
    count the parent's RSS, which a child started by vfork holds until its exec. Without
    procfs (macOS), ``ru_maxrss`` all the same."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # bytes on macOS, KiB on Linux
        return peak >> 20 if sys.platform == "darwin" else peak >> 10


def map_table(path: str | Path) -> pa.Table:
    """The table files, memory-mapped: pages are shared with every process mapping them. The
    text columns have a chunk per block of the data file, the numbers one chunk each."""
    return joined(_map(texts_file(path)), map_numbers(path))


def map_numbers(path: str | Path) -> pa.Table:
    """The table's per-row numbers only (weights, ids), memory-mapped."""
    return _map(path)


def _map(path: str | Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


if __name__ == "__main__":
    sys.exit(_child_main())
