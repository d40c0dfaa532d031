"""Images: fetched once per run into a node-local cache, with retries, checked by the prefetch.

A remote image (http(s)://, s3:// or any fsspec URL) is fetched once and stored in
``<cache>/images/`` under the SHA-256 of its location; every later read (the rest of the
prefetch, every epoch, every rank and DataLoader worker on the node) reads that file. Local
paths (including mounted PVCs) are read where they are and not copied.

The cache stores the original bytes, not resized uint8 pixels: the bytes are as small as
the source (a 224 x 224 x 3 uint8 image is 150 KB, a typical product JPEG 20-50 KB, so 10M
images would take 1.5 TB instead of 0.2-0.5 TB), they serve any model resolution and
augmentation, and they keep the crop taken from the full image. The decode cost is cut
instead by JPEG draft mode: the decoder scales by 1/2, 1/4 or 1/8 while decoding whenever
the result stays at least the model's input size (``decode(..., at_least=...)``).

Errors:

* transient (timeouts, connection resets, HTTP 408/429/5xx, a transfer slower than
  ``FETCH_DEADLINE_S``, other network OSErrors) are retried with exponential backoff; when
  retries run out, ``TransientImageError`` is raised, which is not a permanent error: the
  trainer exits non-78 and the pod is restarted;
* permanent (HTTP 4xx such as 404, a redirect loop, a malformed URL, a missing file, a file
  or body larger than ``MAX_IMAGE_BYTES``, bytes that do not decode, such as an HTML page
  served with 200, an image above PIL's decompression-bomb limit) follow
  ``data.onBadImage``: ``fail`` stops the run with a DataError naming every bad image's row
  (exit 78), ``skip`` drops the rows that use them, names the first few in the log and in
  ``status.data``, and still fails when more than ``data.maxBadFraction`` of the distinct
  images are bad.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from kontrast.api.data import Data

from .. import storage
from ..errors import DataProblem
from ..report import heartbeat
from ..layout import CacheFolder
from ..locations import has_scheme

if TYPE_CHECKING:
    import urllib3

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 30        #: connecting, and each wait for more bytes
FETCH_DEADLINE_S = 60      #: one attempt's whole transfer: a server trickling bytes cannot hold a thread longer
RETRIES = 5               #: attempts after the first
BACKOFF_S = 0.5           #: first wait; doubles each retry, with jitter, capped at BACKOFF_MAX_S
BACKOFF_MAX_S = 16.0
PREFETCH_THREADS = 16     #: I/O bound: threads wait on the network, not the CPU
PREFETCH_WINDOW = 4096    #: locations read (and futures queued) at a time: memory stays flat
PREFETCH_PIXELS = 64_000_000   #: decoded pixels in flight per process (RGB: ~0.2 GB; one larger image decodes alone)
#: One image's file or HTTP body; a larger one is a bad image and is never read whole (a 2 GB
#: file or an endless body would otherwise be held in memory by each of 16 threads).
MAX_IMAGE_BYTES = 64 << 20
NAMED_BAD = 5             #: bad images named in the log and in status
#: An image cache temporary file this old is an orphan (its writer was killed): a write of
#: bytes already in memory takes milliseconds.
ORPHAN_AGE_S = 600


class TransientImageError(Exception):
    """A fetch failed for a reason that may pass (network, server overload) after all retries."""


class PermanentImageError(Exception):
    """The image does not exist or does not decode: retrying cannot help."""


#: Redirects followed per fetch (CDNs, signed URLs); every other retry is ``with_retries``'s, with backoff.
REDIRECTS = 5
_pools: dict[int, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()


def _http() -> urllib3.PoolManager:
    """This process's connection pool: kept-alive connections (and TLS sessions) serve many
    images each, which matters more than anything else in a prefetch of a million URLs. One
    per process id, because a pool's sockets must not cross a fork into DataLoader workers.
    urllib3 is imported here: a check of local images does without it (20 ms)."""
    import urllib3

    pid = os.getpid()
    with _pools_lock:
        if pid not in _pools:
            follow_redirects_only = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                                  redirect=REDIRECTS, raise_on_status=False)
            _pools[pid] = urllib3.PoolManager(num_pools=64, maxsize=PREFETCH_THREADS, retries=follow_redirects_only,
                                              timeout=urllib3.Timeout(connect=HTTP_TIMEOUT_S, read=HTTP_TIMEOUT_S),
                                              headers={"User-Agent": "kontrast"})
        return _pools[pid]


def _fetch_http(location: str) -> bytes:
    import urllib3

    deadline = time.monotonic() + FETCH_DEADLINE_S
    try:
        resp = _http().request("GET", location, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise _http_error(exc) from None
    try:
        if resp.status in (408, 429) or resp.status >= 500:
            raise TransientImageError(f"HTTP {resp.status} {resp.reason}")
        if resp.status >= 400:
            raise PermanentImageError(f"HTTP Error {resp.status}: {resp.reason}")
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_IMAGE_BYTES:
            raise _too_large()
        return _body_until(resp, deadline)
    except urllib3.exceptions.HTTPError as exc:
        resp.close()
        raise _http_error(exc) from None
    except BaseException:
        resp.close()   # the rest of the body is unread: this connection cannot serve another request
        raise
    finally:
        resp.release_conn()


def _body_until(resp, deadline: float) -> bytes:
    """The response body, or TransientImageError once ``deadline`` passes: each socket read
    is bounded by HTTP_TIMEOUT_S, so the whole transfer is bounded by the deadline plus one.
    A body without a Content-Length (or a false one) is cut off past MAX_IMAGE_BYTES."""
    chunks, size = [], 0
    while True:
        chunk = resp.read1(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_IMAGE_BYTES:
            raise _too_large()
        if time.monotonic() > deadline:
            raise TransientImageError(f"the transfer took longer than {FETCH_DEADLINE_S} s ({size} bytes so far)")


def _too_large() -> PermanentImageError:
    return PermanentImageError(f"image larger than {MAX_IMAGE_BYTES} bytes")


def _read_whole(f, size: Optional[int]) -> bytes:
    """The file, or PermanentImageError past MAX_IMAGE_BYTES. ``size``: the file's size where
    it is known up front; otherwise (a pipe, a device, some fsspec files) at most one byte
    over the limit is read."""
    if size is not None and size > MAX_IMAGE_BYTES:
        raise _too_large()
    data = f.read() if size is not None else f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:      # it grew after its size was read
        raise _too_large()
    return data


def _http_error(exc: urllib3.exceptions.HTTPError) -> Exception:
    """urllib3's errors all subclass HTTPError, the permanent ones too: a malformed URL (or
    redirect target) and a redirect loop cannot pass, anything else (timeouts, resets,
    refused connections, broken responses) may."""
    import urllib3

    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    if isinstance(reason, urllib3.exceptions.LocationValueError):
        return PermanentImageError(f"malformed URL: {reason}")
    if isinstance(reason, urllib3.exceptions.ResponseError) and "redirect" in str(reason):
        return PermanentImageError(f"more than {REDIRECTS} redirects (a redirect loop?)")
    return TransientImageError(f"{type(reason or exc).__name__}: {reason or exc}")


def fetch_bytes(location: str) -> bytes:
    """One attempt to read an image; raises TransientImageError or PermanentImageError."""
    if location.startswith(("http://", "https://")):
        return _fetch_http(location)
    try:
        if has_scheme(location):
            import fsspec

            with fsspec.open(location, "rb") as f:
                size = getattr(f, "size", None)
                return _read_whole(f, size if isinstance(size, int) else None)
        with open(location, "rb") as f:
            status = os.fstat(f.fileno())
            return _read_whole(f, status.st_size if stat.S_ISREG(status.st_mode) else None)
    except (FileNotFoundError, IsADirectoryError):
        raise PermanentImageError("file not found") from None
    except PermissionError as exc:
        raise PermanentImageError(f"permission denied: {exc}") from None
    except (socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
        raise TransientImageError(f"{type(exc).__name__}: {exc}") from None


def with_retries(fetch: Callable[[str], bytes], location: str, *, retries: Optional[int] = None,
                 sleep: Callable[[float], None] = time.sleep) -> bytes:
    """``fetch(location)``, retrying transient errors with exponential backoff and jitter."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fetch(location)
        except TransientImageError as exc:
            if attempt == retries:
                raise TransientImageError(f"{location}: {exc} (after {retries + 1} attempts)") from None
            wait = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt) * (0.5 + random.random())
            log.debug("%s: %s; retrying in %.1f s", location, exc, wait)
            sleep(wait)
    raise AssertionError("unreachable")


class PixelBudget:
    """Decoded pixels in flight across threads. Only JPEG decodes at a reduced size (draft
    mode): 16 threads decoding 81-megapixel PNGs at once held 8 GB. A thread waits until its
    image fits; an image larger than the whole budget waits for all of it."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def decode(data: bytes, at_least: Optional[int] = None, budget: Optional[PixelBudget] = None) -> Image.Image:
    """Decode fully (``load``: a truncated file fails here, not mid-run) to RGB.

    ``at_least``: JPEGs may be decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay
    at least this many pixels (PIL draft mode; the decoder skips the detail). ``budget``:
    wait until the image's pixels fit in it (the header gives the size before decoding).
    Images above PIL's decompression-bomb limit (about 179 megapixels) are bad images.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if at_least and img.format == "JPEG":
            img.draft("RGB", (at_least, at_least))
        with budget.hold(img.width * img.height) if budget else contextlib.nullcontext():
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise PermanentImageError(f"not an image ({len(data)} bytes beginning {data[:24]!r})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the data's problem
        raise PermanentImageError(f"{type(exc).__name__}: {exc}") from None


class ImageCache:
    """Node-local image bytes keyed by the SHA-256 of the location (remote images only)."""

    def __init__(self, folder: str | Path, fetch: Callable[[str], bytes] = fetch_bytes):
        self.root = str(folder)
        self.folder = CacheFolder(self.root).images
        self.incoming = CacheFolder(self.root).incoming_images   # one folder: orphans are found without a walk
        self.fetch = fetch

    def path(self, location: str) -> Path:
        key = hashlib.sha256(location.encode("utf-8")).hexdigest()
        return self.folder / key[:2] / key

    def load(self, location: str, at_least: Optional[int] = None,
             budget: Optional[PixelBudget] = None) -> Image.Image:
        """The decoded image: from the cache, else fetched (with retries) and stored. Only
        bytes that decode are stored, and a stored copy that no longer decodes is fetched
        again: an error page served with 200 or a cut transfer must not stay bad after the
        server recovers."""
        if not has_scheme(location):
            return decode(with_retries(self.fetch, location), at_least, budget)
        path = self.path(location)
        try:
            return decode(path.read_bytes(), at_least, budget)
        except FileNotFoundError:
            pass
        except PermanentImageError as exc:
            log.warning("%s: the cached copy %s does not decode (%s); fetching it again", location, path, exc)
            path.unlink(missing_ok=True)
        data = with_retries(self.fetch, location)
        image = decode(data, at_least, budget)
        # atomic: a concurrent reader sees the whole file or none
        storage.write_atomic(str(path), lambda f: f.write(data), durable=False, staging=self.incoming)
        return image

    def remove_orphans(self) -> None:
        """Delete what writers killed mid-write left in the cache (every process may call it)."""
        removed = storage.remove_temporaries(self.incoming, older_than_s=ORPHAN_AGE_S)
        if removed:
            log.info("removed %d image cache file(s) a killed process was writing", len(removed))

    def __reduce__(self):
        return (ImageCache, (self.root, self.fetch))


@dataclass
class BadImage:
    row: int          #: table row (0-based) of the first row using it
    location: str
    reason: str


def prefetch(cache: ImageCache, images: Sequence[str], first_rows: Sequence[int], *,
             threads: int = PREFETCH_THREADS, progress: bool = False, label: str = "images") -> list[BadImage]:
    """Fetch and decode every image once (threads: the work is I/O), filling the cache.

    ``images`` may be a lazy sequence (cells of an Arrow column): it is read PREFETCH_WINDOW
    locations at a time, so a catalogue of millions of images never becomes millions of
    Python strings and futures at once. Returns the permanent failures; a transient failure
    after all retries raises.
    """
    budget = PixelBudget(PREFETCH_PIXELS)

    def one(item) -> Optional[BadImage]:
        location, row = item
        try:
            # the smallest draft (1/8 scale): the decoder still reads the whole entropy-coded
            # stream, so truncated data fails here, for 12% less work than 1/4 scale
            cache.load(location, at_least=1, budget=budget)
            return None
        except PermanentImageError as exc:
            return BadImage(int(row), location, str(exc))

    n = len(images)
    if not n:
        return []
    cache.remove_orphans()
    bar = _progress(n, label) if progress else None
    bad = []
    done = 0
    heartbeat.stage(heartbeat.PREFETCHING, done, n)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as pool:
        for start in range(0, n, PREFETCH_WINDOW):
            window = [(images[i], first_rows[i]) for i in range(start, min(n, start + PREFETCH_WINDOW))]
            for result in pool.map(one, window):
                if result is not None:
                    bad.append(result)
                done += 1
                heartbeat.stage(heartbeat.PREFETCHING, done, n)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return bad


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"prefetch {label}", unit="img", file=sys.stderr, mininterval=2.0,
                disable=not sys.stderr.isatty())


@dataclass
class BadImageReport:
    file: str
    checked: int
    skipped_rows: int = 0
    bad: list[BadImage] = field(default_factory=list)

    def status(self) -> dict:
        return {"file": self.file, "checkedImages": self.checked, "badImages": len(self.bad),
                "skippedRows": self.skipped_rows,
                "examples": [f"{b.location}: {b.reason}" for b in self.bad[:NAMED_BAD]]}


def problems_of(bad: Sequence[BadImage], file: str, column: str) -> list[DataProblem]:
    return [DataProblem(file, f"cannot read image {b.location!r}: {b.reason}", row=b.row + 1, column=column)
            for b in sorted(bad, key=lambda b: b.row)]


def too_many(bad: int, checked: int, policy: Data) -> Optional[str]:
    """Why skipping is not allowed here (``policy``: spec.data), or None."""
    if not policy.skips_bad_images:
        return "data.onBadImage is fail"
    if checked and bad / checked > policy.max_bad_fraction:
        return (f"{bad} of {checked} distinct images ({100.0 * bad / checked:.2f}%) are bad, more than "
                f"data.maxBadFraction ({100.0 * policy.max_bad_fraction:.2f}%)")
    return None
