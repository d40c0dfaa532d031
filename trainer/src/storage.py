"""Writing into ``output``: a local folder, a mounted PVC, or an fsspec object store.

Files are replaced atomically so a reader (a resumed run, the user, a status reporter)
never sees half a file: locally by writing a temporary file in the same folder and
renaming it over the target (rename is atomic within a file system), on object stores by
a single PUT of the whole object (object stores publish an object only when its upload
completes).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .locations import has_scheme

TEMP_SUFFIX = ".tmp"   #: write_atomic's temporary files: ``.<name>.<random><TEMP_SUFFIX>`` beside the target


def join(location: str, *parts: str) -> str:
    if has_scheme(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def _fs(location: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return fs, path


class NoSpace(OSError):
    """A local write ran out of space (ENOSPC, EDQUOT): how far it got and what is free."""

    def __init__(self, target: Path, written: int, free: int):
        super().__init__(errno.ENOSPC, f"no space left for {target}: {written} bytes written, {free} bytes free")
        self.target, self.written, self.free = target, written, free


class _KeepsWriteError:
    """A file whose failed write keeps its OSError: torch.save turns it into a RuntimeError
    ("unexpected pos") that no longer says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def write_atomic(location: str, write: Callable[[io.BufferedIOBase], None], *, durable: bool = True,
                 staging: Optional[Path] = None) -> None:
    """Call ``write(fileobj)`` and publish the result at ``location`` all at once.

    ``durable``: a local file is flushed to disk before it is renamed into place (what a
    checkpoint needs); the node's caches, rebuilt when lost, skip that. ``staging``: the
    local folder of the temporary file (same file system), beside the target by default."""
    if has_scheme(location):
        buf = io.BytesIO()
        write(buf)
        fs, path = _fs(location)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    target = Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    if staging is not None:
        staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=staging or target.parent)
    f = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the volume's other users
        with os.fdopen(fd, "wb") as raw:
            f = _KeepsWriteError(raw)
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        Path(tmp).unlink(missing_ok=True)
        cause = f.error if f is not None and f.error is not None else exc
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(target, written, shutil.disk_usage(target.parent).free) from exc
        raise


def remove_temporaries(folder: str | Path, name: str = "", older_than_s: float = 0.0) -> list[str]:
    """Delete the temporary files ``write_atomic`` left in a local ``folder`` (for targets
    starting with ``name``, unchanged for ``older_than_s``): a process killed while writing
    (SIGKILL after the grace period) leaves one, as large as the file it was writing. Only
    for a folder nobody else is writing to now, or with an age no write takes; object
    stores have none (one PUT)."""
    if has_scheme(str(folder)) or not Path(folder).is_dir():
        return []
    removed, now = [], time.time()
    for path in Path(folder).glob(f".{name}*{TEMP_SUFFIX}"):
        try:
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed.append(str(path))
        except FileNotFoundError:
            pass
    return removed


def upload(local: str | Path, location: str) -> None:
    """Publish a local file at ``location`` (an object store: one streamed PUT, no copy in memory)."""
    if has_scheme(location):
        fs, path = _fs(location)
        fs.put_file(str(local), path)
    else:
        with open(local, "rb") as src:
            write_atomic(location, lambda f: shutil.copyfileobj(src, f))


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_text(location: str, text: str) -> None:
    write_atomic(location, lambda f: f.write(text.encode("utf-8")))


def exists(location: str) -> bool:
    if has_scheme(location):
        fs, path = _fs(location)
        return fs.exists(path)
    return Path(location).exists()


def list_names(folder: str) -> list[str]:
    """Names of the files directly in ``folder`` (empty if it does not exist)."""
    if has_scheme(folder):
        fs, path = _fs(folder)
        fs.invalidate_cache(path)  # another process (a previous run, another rank) may have written
        if not fs.exists(path):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    p = Path(folder)
    return sorted(x.name for x in p.iterdir() if x.is_file()) if p.is_dir() else []


def open_read(location: str):
    if has_scheme(location):
        import fsspec

        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def delete(location: str) -> None:
    """Remove a file (gone already is fine: deleting twice must not fail a run)."""
    if has_scheme(location):
        fs, path = _fs(location)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        return
    Path(location).unlink(missing_ok=True)
