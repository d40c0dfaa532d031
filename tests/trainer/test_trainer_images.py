"""Images over the network: fetched once into the node's cache, transient errors retried,
permanent ones handled by data.onBadImage. A real HTTP server on loopback counts requests
and plays the failures."""

from __future__ import annotations

import csv
from pathlib import Path

import fsspec
import pytest

import kontrast.trainer.data.images as images
from kontrast.trainer.data.load import load_data
from kontrast.trainer.errors import DataError
from kontrast.trainer.data.images import ImageCache, TransientImageError, with_retries
from harness.image_server import ImageServer
from specs import params_of

SPEC = {"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"],
        "rightWeights": [0.75, 0.25], "weightKey": "score"}


@pytest.fixture
def server(small_data):
    s = ImageServer(small_data)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "BACKOFF_S", 0.01)
    monkeypatch.setenv("KONTRAST_CACHE", str(tmp_path / "cache"))


def http_copy(small_data: Path, server: ImageServer, out: Path, name: str = "train32.csv") -> Path:
    """``name`` with every image given by its URL on the server."""
    with open(small_data / name, newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        row[1] = f"{server.base}/{row[1]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out


def image_paths(csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as f:
        return sorted({"/" + r["image"].split("/", 3)[3] for r in csv.DictReader(f)})


# ------------------------------------------------------------------------------------------------

def test_each_image_is_fetched_once_per_run_and_epoch_2_reads_the_cache(run_training, base_spec, small_data,
                                                                         server, tmp_path):
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    spec = {**base_spec, "trainData": str(data), "batchSize": 8, "epochs": 2, "workers": 2,
            "data": {"cache": str(tmp_path / "cache")}}
    spec.pop("evalData")
    summary, _ = run_training(spec)
    assert summary["epoch"] == 2
    paths = image_paths(data)
    assert dict(server.hits) == {p: 1 for p in paths}     # the prefetch's fetch, then only the cache
    assert len(list((tmp_path / "cache" / "images").rglob("*"))) >= len(paths)


def test_transient_errors_are_retried_and_training_succeeds(run_training, base_spec, small_data, server, tmp_path, h):
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    first, second = image_paths(data)[:2]
    server.fail[first] = [503, 429]
    server.fail[second] = ["drop"]
    spec = {**base_spec, "trainData": str(data), "batchSize": 8, "epochs": 1}
    spec.pop("evalData")
    summary, _ = run_training(spec)
    assert summary["epoch"] == 1 and summary["finalLoss"] is not None
    assert (server.hits[first], server.hits[second]) == (3, 2)


def test_transient_errors_past_the_retries_are_not_data_errors(small_data, server, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "RETRIES", 2)
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    path = image_paths(data)[0]
    server.fail[path] = [503] * 10
    with pytest.raises(TransientImageError, match="HTTP 503") as info:
        load_data(str(data), params_of(SPEC), require_positive_weight=True)
    assert not isinstance(info.value, DataError) and server.hits[path] == 3


def test_fetches_share_kept_alive_connections_and_follow_redirects(small_data, server, tmp_path):
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv", name="train.csv")
    locations = sorted({r["image"] for r in csv.DictReader(open(data, newline=""))})
    moved = locations[0].replace(server.base, server.base + "/moved")
    before = server.connections
    bad = images.prefetch(ImageCache(tmp_path / "c"), [moved, *locations[1:]], range(len(locations)), threads=2)
    assert bad == []                                   # the redirect was followed, not a bad image
    assert server.hits["/moved" + moved.split("/moved", 1)[1]] == 1
    # one kept-alive connection per thread serves many images (not a connection per image)
    assert len(locations) > 10 and server.connections - before <= 2


def test_backoff_doubles():
    waits, calls = [], []

    def flaky(location):
        calls.append(location)
        if len(calls) < 4:
            raise TransientImageError("reset")
        return b"ok"

    assert with_retries(flaky, "x", sleep=waits.append) == b"ok"
    assert len(waits) == 3 and all(0.4 < waits[i + 1] / waits[i] < 6 for i in range(2))
    assert waits[0] < waits[2]


def test_bad_images_fail_the_run_naming_rows(small_data, server, tmp_path):
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    missing = image_paths(data)[0]
    server.fail[missing] = [404] * 3
    with pytest.raises(DataError) as info:
        load_data(str(data), params_of(SPEC), require_positive_weight=True)
    err = info.value
    assert err.column == "image" and err.row is not None and "404" in str(err) and missing in str(err)
    assert server.hits[missing] == 1          # a 404 is not retried


def test_undecodable_bytes_are_a_bad_image(tmp_path, h):
    h.write_image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    path = h.write_csv(tmp_path / "train.csv", [["query", "image", "title", "score"],
                                                ["a", "ok.png", "t", "1"], ["b", "broken.png", "t", "1"],
                                                ["c", "ok.png", "t", "1"], ["d", "gone.png", "t", "1"]])
    with pytest.raises(DataError) as info:
        load_data(str(path), params_of(SPEC), require_positive_weight=True)
    err = info.value
    assert [(p.row, p.line, p.column) for p in err.problems] == [(2, 3, "image"), (4, 5, "image")]
    assert "broken.png" in str(err.problems[0]) and "file not found" in str(err.problems[1])


def test_prefetch_reads_lazy_locations_a_window_at_a_time(tmp_path, h, monkeypatch):
    """A corpus's images come as cells of an Arrow column (no list of millions of strings),
    read a window at a time; every image is still checked and a bad one keeps its row."""
    import numpy as np
    import pyarrow as pa

    from kontrast.trainer.data.examples import StringColumn

    monkeypatch.setattr(images, "PREFETCH_WINDOW", 3)
    names = [h.write_image(tmp_path / f"{i}.png", colour=(i * 30, 0, 0)) for i in range(7)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    column = pa.array([str(p) for p in [*names[:5], tmp_path / "broken.png", *names[5:]]], pa.large_string())
    seen, load = [], ImageCache.load
    monkeypatch.setattr(ImageCache, "load", lambda self, where, **kw: (seen.append(where), load(self, where, **kw))[1])
    mine = np.arange(1, 8)                           # a process's share: every cell but the first
    bad = images.prefetch(ImageCache(tmp_path / "c"), StringColumn(column, mine), mine + 100, threads=2)
    assert [(b.row, b.location) for b in bad] == [(105, str(tmp_path / "broken.png"))]
    assert sorted(seen) == sorted(column[int(i)].as_py() for i in mine)     # each of the share, once


def test_skip_drops_the_rows_and_reports_them(run_training, base_spec, small_data, server, tmp_path, h):
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    bad = image_paths(data)[0]
    server.fail[bad] = [404] * 5
    with open(data, newline="") as f:
        using = sum(r["image"].endswith(bad) for r in csv.DictReader(f))
    spec = {**SPEC, "data": {"onBadImage": "skip", "maxBadFraction": 0.2}}
    ex, report = load_data(str(data), params_of(spec), require_positive_weight=True)
    assert len(ex) == 32 - using and report.skipped_rows == using and len(report.bad) == 1
    assert all(not ex.image(i).endswith(bad) for i in range(len(ex)))
    status = report.status()
    assert status["badImages"] == 1 and bad in status["examples"][0] and "404" in status["examples"][0]
    from kontrast.trainer.report.cluster_status import conform, status_schema

    assert conform({"data": {"badImages": [status]}}, status_schema()) == {"data": {"badImages": [status]}}

    # a whole run: trains on the rest, and the start event (status.data in a cluster) names the image
    run_spec = {**base_spec, "trainData": str(data), "batchSize": 8, "epochs": 1,
                "data": {"onBadImage": "skip", "maxBadFraction": 0.2}}
    run_spec.pop("evalData")
    summary, _ = run_training(run_spec)
    start = [e for e in h.read_jsonl(Path(run_spec["output"]) / "progress.jsonl") if e["event"] == "start"][0]
    assert start["data"]["badImages"][0]["skippedRows"] == using


def test_skip_fails_past_the_fraction(small_data, server, tmp_path):
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    paths = image_paths(data)
    for p in paths[:3]:
        server.fail[p] = [404] * 5
    spec = {**SPEC, "data": {"onBadImage": "skip", "maxBadFraction": 0.05}}
    with pytest.raises(DataError, match=r"3 of \d+ distinct images .* more than data.maxBadFraction \(5.00%\)") as info:
        load_data(str(data), params_of(spec), require_positive_weight=True)
    assert paths[0] in str(info.value)


def test_fsspec_urls_are_cached_by_location(tmp_path, h):
    h.write_image(tmp_path / "web.png", colour=(1, 2, 3))
    with fsspec.open("memory://bucket/imgs/mem.png", "wb") as f:
        f.write((tmp_path / "web.png").read_bytes())
    cache = ImageCache(tmp_path / "c")
    assert cache.load("memory://bucket/imgs/mem.png").getpixel((0, 0)) == (1, 2, 3)
    fsspec.filesystem("memory").rm("/bucket/imgs/mem.png")
    assert cache.load("memory://bucket/imgs/mem.png").getpixel((0, 0)) == (1, 2, 3)   # from the cache
    assert cache.path("memory://bucket/imgs/mem.png") != cache.path("memory://other/imgs/mem.png")


def test_redirect_loops_and_malformed_urls_are_bad_images_not_transient(small_data, server, tmp_path):
    """urllib3's MaxRetryError (redirects exhausted) and LocationParseError subclass its
    HTTPError: they are permanent, so onBadImage: skip applies instead of six attempts and a
    restart."""
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    paths = image_paths(data)
    with open(data, newline="") as f:
        rows = list(csv.reader(f))
    rows[1][1] = f"{server.base}/loop{paths[0]}"
    rows[2][1] = "http://[bad/cat.png"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    spec = {**SPEC, "data": {"onBadImage": "skip", "maxBadFraction": 0.5}}
    _, report = load_data(str(data), params_of(spec), require_positive_weight=True)
    examples = report.status()["examples"]
    assert any("/loop/" in e and "redirects" in e for e in examples), examples
    assert any("[bad" in e and "malformed URL" in e for e in examples), examples
    assert server.hits[f"/loop{paths[0]}"] == 1 + images.REDIRECTS   # one attempt


def test_a_trickling_server_is_cut_off_at_the_deadline_and_retried(small_data, tmp_path, monkeypatch):
    """One byte a second would hold a prefetch thread for minutes (each read is within the
    read timeout); the attempt ends at FETCH_DEADLINE_S as a transient error, and the retry
    gets the image once the server recovers."""
    server = ImageServer(small_data, trickle_s=1.0)
    try:
        monkeypatch.setattr(images, "FETCH_DEADLINE_S", 0.5)
        data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
        path = image_paths(data)[0]
        url = server.base + path
        assert len((small_data / path.lstrip("/")).read_bytes()) > 60     # a minute at one byte a second
        server.fail[path] = ["trickle", "trickle"]
        with pytest.raises(TransientImageError, match=r"took longer than 0.5 s .* \(after 2 attempts\)"):
            with_retries(images.fetch_bytes, url, retries=1)
        server.fail[path] = ["trickle"]
        assert with_retries(images.fetch_bytes, url, retries=1) == (small_data / path.lstrip("/")).read_bytes()
    finally:
        server.close()


@pytest.mark.parametrize("bad", ["html", "damaged cache"])
def test_bytes_that_do_not_decode_are_not_cached_and_the_image_recovers(small_data, server, tmp_path, bad):
    """An HTML page served with 200 is a bad image now but not forever: nothing is cached, so
    the next read after the server recovers fetches it again; a cached copy damaged later is
    dropped and fetched again. The reason names the bytes, not a BytesIO object."""
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    path = image_paths(data)[0]
    url, cache = server.base + path, ImageCache(tmp_path / "c")
    if bad == "html":
        server.fail[path] = ["html"]
        with pytest.raises(images.PermanentImageError) as info:
            cache.load(url)
        assert "not an image" in str(info.value) and "DOCTYPE html" in str(info.value)
        assert "BytesIO" not in str(info.value) and not cache.path(url).exists()
    else:
        cache.load(url)
        cache.path(url).write_bytes(cache.path(url).read_bytes()[:40])
    hits, original = server.hits[path], (small_data / path.lstrip("/")).read_bytes()
    assert cache.load(url).tobytes() == images.decode(original).tobytes()
    assert server.hits[path] == hits + 1 and cache.path(url).read_bytes() == original


def test_a_truncated_body_is_retried(small_data, server, tmp_path):
    """Fewer bytes than the Content-Length announced is a broken transfer, not a bad image."""
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    path = image_paths(data)[0]
    server.fail[path] = ["truncate"]
    original = (small_data / path.lstrip("/")).read_bytes()
    assert ImageCache(tmp_path / "c").load(server.base + path).tobytes() == images.decode(original).tobytes()
    assert server.hits[path] == 2


def test_the_image_caches_orphans_are_removed_by_the_next_prefetch(small_data, server, tmp_path):
    """Files being written go through one staging folder; the prefetch deletes those older than
    any write takes (a writer killed mid-write), not the ones being written now."""
    import os
    import time

    cache = ImageCache(tmp_path / "c")
    cache.incoming.mkdir(parents=True)
    orphan, fresh = cache.incoming / ".ab12.x1.tmp", cache.incoming / ".cd34.x2.tmp"
    for f in (orphan, fresh):
        f.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    locations = sorted({r["image"] for r in csv.DictReader(open(data, newline=""))})
    assert images.prefetch(cache, locations, range(len(locations))) == []
    assert not orphan.exists() and fresh.exists()
    assert sorted(p.name for p in cache.incoming.iterdir()) == [fresh.name]   # nothing else staged is left


_PEAK = """
import sys
import kontrast.trainer.data.images as images
from pathlib import Path

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024

paths = sys.argv[2:]
images.decode(Path(paths[0]).read_bytes())              # PIL's decoders loaded before the baseline
before = hwm()
bad = images.prefetch(images.ImageCache(sys.argv[1]), paths, range(len(paths)), threads=16)
assert bad == [], bad
print(hwm() - before)
"""


def test_the_prefetch_holds_a_bounded_number_of_decoded_pixels(tmp_path):
    """12 PNGs of 16 megapixels (PNG has no draft mode: each decodes whole, 48 MB as RGB) on
    16 threads: at most PREFETCH_PIXELS (64 MP) are decoded at a time, so the peak grows by a
    few of them, not by all twelve (about 1.1 GB with the RGB copies)."""
    import subprocess
    import sys

    from PIL import Image

    paths = []
    for i in range(12):
        path = tmp_path / f"big-{i}.png"
        Image.new("RGB", (4000, 4000), (i * 20, 0, 0)).save(path)
        paths.append(str(path))
    done = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "c"), *paths], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    grown = int(done.stdout.strip())
    assert grown < 500e6, f"the prefetch's peak memory grew by {grown / 1e6:.0f} MB"


@pytest.mark.parametrize("body", ["announced", "endless"])
def test_an_image_larger_than_the_byte_limit_is_a_bad_image(small_data, server, tmp_path, monkeypatch, body):
    """A body over MAX_IMAGE_BYTES is refused by its Content-Length before it is read, or cut
    off once it grows past the limit when no length is announced (an endless body would fill
    memory). It is a bad image like any other: fetched once, not retried, never cached."""
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    data = http_copy(small_data, server, tmp_path / "web" / "train.csv")
    path = image_paths(data)[0]
    assert (small_data / path.lstrip("/")).stat().st_size > 100
    if body == "endless":
        server.fail[path] = ["endless"]
    url, cache = server.base + path, ImageCache(tmp_path / "c")
    bad = images.prefetch(cache, [url], [7])
    assert [(b.row, b.location, b.reason) for b in bad] == [(7, url, "image larger than 100 bytes")]
    assert server.hits[path] == 1 and not cache.path(url).exists()


@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_a_file_larger_than_the_byte_limit_is_a_bad_image(tmp_path, h, monkeypatch, where):
    """Local paths and fsspec URLs are bounded like HTTP bodies: the size is checked before
    the file is read."""
    image = h.write_image(tmp_path / "big.png", size=64)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", image.stat().st_size - 1)
    location = str(image)
    if where == "fsspec":
        location = "memory://bucket/imgs/big.png"
        with fsspec.open(location, "wb") as f:
            f.write(image.read_bytes())
    with pytest.raises(images.PermanentImageError, match=f"^image larger than {image.stat().st_size - 1} bytes$"):
        ImageCache(tmp_path / "c").load(location)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", image.stat().st_size)
    assert ImageCache(tmp_path / "c").load(location).size == (64, 64)


def test_an_image_above_the_decompression_bomb_limit_is_a_bad_image(tmp_path, h, monkeypatch):
    """The pixels of one image are bounded by PIL's bomb limit (twice Image.MAX_IMAGE_PIXELS,
    about 179 megapixels, as the README says); the header is enough to refuse it."""
    from PIL import Image

    assert round(2 * Image.MAX_IMAGE_PIXELS / 1e6) == 179
    image = h.write_image(tmp_path / "wide.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)
    with pytest.raises(images.PermanentImageError, match="DecompressionBombError"):
        images.decode(image.read_bytes())


def test_the_readme_states_the_image_limits_the_code_applies():
    from PIL import Image

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    limits = readme.split("Three limits", 1)[1].split("Transient errors", 1)[0]
    assert f"{images.MAX_IMAGE_BYTES >> 20} MiB of bytes per image" in limits
    assert f"about {round(2 * Image.MAX_IMAGE_PIXELS / 1e6)} megapixels per image" in limits
    assert f"{images.PREFETCH_PIXELS // 1_000_000} megapixels decoded at a time per process" in limits
