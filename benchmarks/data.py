"""Data benchmarks: loader throughput against open_clip's CsvDataset, and start-up at scale.

    python benchmarks/data.py loader   [--images 384 --workers 1 2 --rounds 3]
    python benchmarks/data.py startup  [--rows 1000000 --ranks 1 2]

``loader``: images/s of one epoch through a DataLoader, per worker count, on the same
generated 640 x 480 JPEGs and the same open_clip training transform (224-pixel
RandomResizedCrop) and tokenizer:

* open_clip: ``open_clip_train.data.CsvDataset`` over local files (float32 tensors);
* ours, cold: the images given as http:// URLs on a loopback server (its own process, HTTP/1.1)
  and an empty cache, so the time is the prefetch (fetch, store, check) plus the first epoch;
* ours, cold file://: the same through the cache from ``file://`` URLs: the cache's own cost
  without a server taking a share of the same cores;
* ours, warm: the second epoch, every image read from the cache;
* ours, local: images given as local paths (no cache involved).

``startup``: a generated catalogue of N rows (query, image, title, score; 500 distinct
images) as CSV and as Parquet; for each reader, a fresh process per rank loads the file
until it is ready to train (table checked, every distinct image checked) and reports wall
time, peak RSS, and the growth of its private memory (Private_Clean + Private_Dirty from
/proc/self/smaps_rollup), of its anonymous memory (heap: what no other process can share)
and PSS over the process's baseline after imports. "main" is the
reader of main at the commit below (``git show``), run from a temporary copy; "ours cold"
builds the node's table file, "ours warm" maps an existing one.

``memory``: the table builder, a rank and ``kontrast train --check`` at N rows (the same
catalogue, written a million rows at a time), "before" (the trainer at ``--before``, imported
from a ``git archive`` of it) against "after" (this tree), each in a fresh process:

* builder: the builder process, started as a training process starts it for a large file
  (``shared_table._build_in_child``: its own interpreter and allocator settings); its peak
  RSS and the growth over a process that only imports it, against the CSV's size;
* rank: with the table built, one process loads the file as a rank does (``load_data``: the
  table mapped, every distinct image checked) and takes trainData's known pairs
  (``run.setup._known_pairs``); then a second rank does the same. Growth of anonymous memory
  (the heap: what no other process shares) per row, and the known pairs' time and bytes per
  rank (after: the first rank builds the node's file, the second maps it);
* check: ``kontrast train job.yaml --check`` from an empty cache (interpreter start included),
  against a naive Python parse of the same file in a fresh interpreter (``csv.DictReader``
  into a list; also a bare ``csv.reader`` pass that keeps nothing).

Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "c1f80de"   #: main before the columnar reader
BEFORE_REV = "bf069c3"     #: main before the streaming builder and the node's known pairs (``memory``)
SPEC = {"leftKeys": ["query"], "leftWeights": [1.0], "rightKeys": ["image", "title"], "rightWeights": [0.75, 0.25],
        "weightKey": "score"}


#: The loader's table: one text and one image per row, the work of open_clip's CsvDataset.
LOADER_SPEC = {**SPEC, "rightKeys": ["image"], "rightWeights": [1.0]}


def params(spec=SPEC, **data):
    """Our reader's parameters: ``spec``, with ``data`` (cache, policy), defaults from the CRD."""
    from kontrast.trainer.params import Params

    return Params.from_spec({"model": "ViT-B-32", "trainData": "/x.csv", "output": "/out", **spec,
                             "data": data}, Path("/"))


# --------------------------------------------------------------------------------------------
# generated data

def make_jpegs(folder: Path, n: int, size=(640, 480)) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus noise), ~40-60 KB each at quality 90."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        noise = rng.normal(0, 12, (size[1], size[0], 3))
        arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def write_catalogue(path: Path, rows: int, images: list[str]) -> None:
    """``rows`` rows of (query, image, title, score) cycling over ``images``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import numpy as np

    idx = np.arange(rows)
    table = pa.table({
        "query": pa.array([f"query number {i % 200_000} about things" for i in idx]),
        "image": pa.array([images[i % len(images)] for i in idx]),
        "title": pa.array([f"product title {i % 300_000} with several words" for i in idx]),
        "score": pa.array([str(1 + i % 3) for i in idx]),
    })
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))


# --------------------------------------------------------------------------------------------
# loader throughput

def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """An image server in its own process, as a remote server would be: it must not share the
    loader's interpreter (and GIL). It still shares this machine's two cores."""
    proc = subprocess.Popen([sys.executable, __file__, "serve-images", str(folder)], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def serve_images(args) -> None:
    import functools
    import http.server      # here, not at the top: the measured ``mem-child check`` must not import it

    class _Quiet(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"      # kept-alive connections, as image CDNs and object stores serve

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=args.folder))
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


def epoch_rate(dataset, workers: int, batch: int = 32, collate=None, sampler=None) -> float:
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate,
                                         shuffle=False, persistent_workers=False)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += (b[0] if isinstance(b, (list, tuple)) else b["image"]).shape[0]
    return n / (time.perf_counter() - t0)


def cached_rates(table: Path, cache: Path, transform, tokenizer, workers: int) -> tuple[float, float]:
    """Images/s through the image cache: (prefetch + epoch 1 from an empty cache, epoch 2)."""
    from kontrast.trainer.data.dataset import PairDataset
    from kontrast.trainer.data.batches import TrainLoader
    from kontrast.trainer.data.load import load_data
    from kontrast.trainer.data.images import ImageCache

    t0 = time.perf_counter()
    ex, _ = load_data(str(table), params(LOADER_SPEC, cache=str(cache)), require_positive_weight=True)
    ds = PairDataset(ex, transform, tokenizer, 224, cache=ImageCache(cache))
    loader = TrainLoader(ds, workers, pin_memory=False)
    order = list(range(len(ds)))
    batches = [order[i:i + 32] for i in range(0, len(order), 32)]
    n = sum(b["image"].shape[0] for b in loader.epoch(0, batches))
    cold = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in loader.epoch(1, batches))
    return cold, n / (time.perf_counter() - t0)


def bench_loader(args) -> None:
    import open_clip
    import torch
    from open_clip_train.data import CsvDataset

    from kontrast.trainer.data.dataset import PairDataset
    from kontrast.trainer.data.batches import TrainLoader
    from kontrast.trainer.data.load import load_data

    tmp = Path(tempfile.mkdtemp(prefix="kontrast-bench-"))
    paths = make_jpegs(tmp / "imgs", args.images)
    kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    transform = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tsv = tmp / "oc.tsv"
    with open(tsv, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for i, p in enumerate(paths):
            w.writerow([str(p), f"product title {i}"])
    server, base = serve(tmp / "imgs")
    print(f"{args.images} JPEGs 640x480, mean {kb:.0f} KB; transform RandomResizedCrop(224) as open_clip trains; "
          f"torch threads 1 per worker", flush=True)
    torch.set_num_threads(1)
    for workers in args.workers:
        for r in range(args.rounds):
            oc = CsvDataset(str(tsv), transform, "filepath", "title", sep="\t", tokenizer=tokenizer)
            oc_rate = epoch_rate(oc, workers)

            cache = tmp / f"cache-{workers}-{r}"
            web = tmp / f"web-{workers}-{r}.csv"
            local, files = tmp / "local.csv", tmp / f"files-{workers}-{r}.csv"
            for out, loc in ((web, lambda p: f"{base}/{p.name}"), (local, str), (files, lambda p: f"file://{p}")):
                with open(out, "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["query", "image", "title", "score"])
                    for i, p in enumerate(paths):
                        w.writerow([f"query {i}", loc(p), f"product title {i}", "1"])
            cold, warm = cached_rates(web, cache, transform, tokenizer, workers)
            cold_file, _ = cached_rates(files, tmp / f"cache-file-{workers}-{r}", transform, tokenizer, workers)

            ex_local, _ = load_data(str(local), params(LOADER_SPEC, cache=str(cache)), require_positive_weight=True)
            ds_local = PairDataset(ex_local, transform, tokenizer, 224)
            loc_loader = TrainLoader(ds_local, workers, pin_memory=False)
            order = list(range(len(ds_local)))
            batches = [order[i:i + 32] for i in range(0, len(order), 32)]
            t0 = time.perf_counter()
            n = sum(b["image"].shape[0] for b in loc_loader.epoch(0, batches))
            local_rate = n / (time.perf_counter() - t0)
            del loc_loader
            print(json.dumps({"workers": workers, "round": r, "open_clip": round(oc_rate, 1),
                              "ours_cold_http": round(cold, 1), "ours_cold_file": round(cold_file, 1),
                              "ours_warm": round(warm, 1),
                              "ours_local": round(local_rate, 1),
                              "cold/open_clip": round(cold / oc_rate, 2),
                              "cold_file/open_clip": round(cold_file / oc_rate, 2),
                              "warm/open_clip": round(warm / oc_rate, 2),
                              "local/open_clip": round(local_rate / oc_rate, 2)}), flush=True)
    server.kill()
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# start-up

def _memory() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Anonymous"):
                out[key] = int(value.split()[0]) / 1024
    return out


def child(args) -> None:
    """One rank: load ``args.file`` with ``args.reader``; print one JSON line."""
    import resource

    if args.reader == "main":
        sys.path.insert(0, args.baseline)
        from baseline_trainer.data import check_images, load_examples as main_load
    else:
        from kontrast.trainer.data.load import load_data
    import numpy  # noqa: F401 - part of the baseline either way
    import pyarrow  # noqa: F401
    before = _memory()
    t0 = time.perf_counter()
    if args.reader == "main":
        ex = main_load(args.file, SPEC)
        checked = check_images(ex)
        n = len(ex)
    else:
        ex, report = load_data(args.file, params(cache=args.cache), require_positive_weight=True)
        checked, n = report.checked, len(ex)
    wall = time.perf_counter() - t0
    after = _memory()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    builder = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024   # the table build, if run here
    private = lambda m: m["Private_Clean"] + m["Private_Dirty"]  # noqa: E731
    print(json.dumps({"rows": n, "images": checked, "wall_s": round(wall, 2), "peak_rss_mib": round(peak),
                      "builder_peak_rss_mib": round(builder),
                      "baseline_rss_mib": round(before["Rss"]),
                      "private_growth_mib": round(private(after) - private(before), 1),
                      "pss_growth_mib": round(after["Pss"] - before["Pss"], 1),
                      "anon_growth_mib": round(after["Anonymous"] - before["Anonymous"], 1)}), flush=True)


def extract_baseline(folder: Path) -> None:
    pkg = folder / "baseline_trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in ("data", "errors", "spec"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_REV}:trainer/src/{name}.py"],
                              check=True, capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(text)


def run_ranks(reader: str, file: Path, ranks: int, cache: Path, baseline: Path) -> list[dict]:
    procs = []
    for r in range(ranks):
        env = {**os.environ, "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(ranks), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "child", "--reader", reader, "--file", str(file), "--cache", str(cache),
             "--baseline", str(baseline)], env=env, stdout=subprocess.PIPE, text=True))
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def bench_startup(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kontrast-startup-"))
    baseline = tmp / "baseline"
    extract_baseline(baseline)
    images = [p.name for p in make_jpegs(tmp / "data", 500, size=(64, 64))]
    for rows in args.rows:
        for suffix in args.formats:
            file = tmp / "data" / f"catalogue-{rows}{suffix}"
            write_catalogue(file, rows, images)
            size = file.stat().st_size / 2 ** 20
            for ranks in args.ranks:
                readers = [r for r in args.readers if r != "main" or suffix == ".csv"]
                for reader in readers:
                    cache = tmp / f"cache-{rows}-{suffix}-{ranks}"
                    if reader == "ours cold":
                        shutil.rmtree(cache, ignore_errors=True)
                    results = run_ranks("main" if reader == "main" else "ours", file, ranks, cache, baseline)
                    table = sum(p.stat().st_size for p in (cache / "tables").glob("*.arrow")) / 2 ** 20 \
                        if reader != "main" else 0
                    print(json.dumps({"rows": rows, "file": suffix, "file_mib": round(size, 1), "ranks": ranks,
                                      "reader": reader, "table_file_mib": round(table, 1), "per_rank": results}),
                          flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# memory at 1M and 10M rows

def write_big_catalogue(path: Path, rows: int, images: list[str], chunk: int = 1_000_000) -> None:
    """``write_catalogue``'s rows, written a chunk at a time (10M rows never in memory at once)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    names = np.array(images, dtype=object)
    writer = None
    for start in range(0, rows, chunk):
        i = np.arange(start, min(rows, start + chunk))
        table = pa.table({
            "query": pa.array(np.char.add(np.char.add("query number ", (i % 200_000).astype(str)), " about things")),
            "image": pa.array(names[i % len(images)].astype(str)),
            "title": pa.array(np.char.add(np.char.add("product title ", (i % 300_000).astype(str)),
                                          " with several words")),
            "score": pa.array((1 + i % 3).astype(str)),
        })
        writer = writer or pacsv.CSVWriter(str(path), table.schema, write_options=pacsv.WriteOptions(
            quoting_style="needed"))
        writer.write_table(table)
    writer.close()


def import_trainer(reader: str, baseline: str):
    """The trainer package: this tree's ("after"), or ``before_trainer``, extracted at ``--before``
    into ``baseline`` (on PYTHONPATH, so the builder's own child process finds it too)."""
    import importlib

    if reader == "after":
        return importlib.import_module("kontrast.trainer")
    sys.path.insert(0, baseline)
    return importlib.import_module("before_trainer")


def mem_child(args) -> None:
    """One measured process: ``build``, ``rank`` or ``check``; prints one JSON line."""
    import importlib
    import resource

    trainer = import_trainer(args.reader, args.baseline)
    name = trainer.__name__
    mod = lambda m: importlib.import_module(f"{name}.{m}")  # noqa: E731
    if args.what_child == "check":
        t0 = time.perf_counter()
        code = mod("cli.train").main([args.job, "--check", "--no-progress", "--log-level", "WARNING"])
        print(json.dumps({"rc": code, "in_process_s": round(time.perf_counter() - t0, 2)}))
        return
    Columns = mod("data.columns").Columns
    if args.what_child == "build":
        shared = mod("data.shared_table")
        imports = f"import {shared.__name__}, pyarrow.compute, pyarrow.csv"   # the builder's, before a row
        _, baseline, _ = _timed([sys.executable, "-c", imports], env={**os.environ, "PYTHONPATH": args.baseline})
        t0 = time.perf_counter()
        # the builder's own peak (VmHWM); before's builder reports none, and its ru_maxrss also
        # counts this process's RSS (vfork), which is far below that builder's peak
        built = shared._build_in_child(args.file, Columns.of(params()), Path(args.target), True) or {}
        wall = time.perf_counter() - t0
        peak = built.get("peak_rss_mib") or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mib": round(peak), "baseline_rss_mib":
                          round(baseline), "growth_mib": round(peak - baseline)}))
        return
    load, setup = mod("data.load"), mod("run.setup")
    world = mod("distributed").World()
    before = _memory()
    t0 = time.perf_counter()
    ex, _ = load.load_data(args.file, params(cache=args.cache), require_positive_weight=True)
    loaded, t1 = _memory(), time.perf_counter()
    known = setup._known_pairs(ex, world)
    t2 = time.perf_counter()
    after = _memory()
    rows = len(ex)
    print(json.dumps({
        "load_s": round(t1 - t0, 2), "known_pairs_s": round(t2 - t1, 2), "known_pairs": len(known),
        "known_pairs_mib": round((known.keys.numel() * 8 + known.rel.numel() * 4) / 2 ** 20, 1),
        "anon_growth_bytes_per_row": round((after["Anonymous"] - before["Anonymous"]) * 2 ** 20 / rows, 1),
        "anon_growth_load_bytes_per_row": round((loaded["Anonymous"] - before["Anonymous"]) * 2 ** 20 / rows, 1),
        "anon_growth_known_mib": round(after["Anonymous"] - loaded["Anonymous"], 1),
        "peak_over_baseline_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before["Rss"])}))


def _timed(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of a command, as ``/usr/bin/time`` sees it: a child's own
    ru_maxrss would start at this process's RSS (fork copies it before exec)."""
    with tempfile.NamedTemporaryFile("r") as times:
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", times.name, *cmd], stdout=subprocess.PIPE,
                              text=True, env=env)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"{cmd} exited {done.returncode}")
        return wall, int(times.read().split()[-1]) / 1024, done.stdout


NAIVE = {"DictReader": "import csv,sys\nwith open(sys.argv[1], newline='') as f: rows = list(csv.DictReader(f))",
         "csv.reader pass": "import csv,sys\nwith open(sys.argv[1], newline='') as f:\n  for r in csv.reader(f): pass"}


def bench_memory(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="kontrast-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "before"
    if not baseline.exists():
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "trainer/src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        (baseline / "trainer" / "src").rename(baseline / "before_trainer")
    data = work / "data"
    images = [p.name for p in make_jpegs(data, 500, size=(64, 64))]
    shutil.copy(ROOT / "examples" / "tiny-vit.json", data / "tiny-vit.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(baseline), os.environ.get("PYTHONPATH")]))}
    me = [sys.executable, __file__, "mem-child"]
    for rows in args.rows:
        csv_file = data / f"catalogue-{rows}.csv"
        if not csv_file.exists():
            write_big_catalogue(csv_file, rows, images)
        csv_mib = csv_file.stat().st_size / 2 ** 20
        job = data / f"job-{rows}.yaml"
        for name, code in NAIVE.items():
            wall, peak, _ = _timed([sys.executable, "-c", code, str(csv_file)])
            print(json.dumps({"rows": rows, "csv_mib": round(csv_mib, 1), "what": f"naive {name}",
                              "wall_s": round(wall, 2), "peak_rss_mib": round(peak)}), flush=True)
        for reader in args.readers:
            cache = work / f"cache-{reader}-{rows}"
            shutil.rmtree(cache, ignore_errors=True)
            job.write_text(json.dumps({"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob",
                                       "metadata": {"name": "bench"},
                                       "spec": {**SPEC, "model": "tiny-vit.json", "trainData": csv_file.name,
                                                "output": "out", "data": {"cache": str(cache)}}}))
            wall, peak, out = _timed([*me, "check", "--reader", reader, "--job", str(job), "--baseline",
                                      str(baseline)], env)
            print(json.dumps({"rows": rows, "csv_mib": round(csv_mib, 1), "reader": reader, "what": "check cold",
                              "wall_s": round(wall, 2), "peak_rss_mib": round(peak),
                              **json.loads(out.splitlines()[-1])}), flush=True)
            target = work / f"table-{reader}-{rows}.arrow"
            _, _, out = _timed([*me, "build", "--reader", reader, "--file", str(csv_file), "--target", str(target),
                                "--baseline", str(baseline)], env)
            built = json.loads(out.splitlines()[-1])
            table_mib = sum(p.stat().st_size for p in work.glob(f"{target.name}*")) / 2 ** 20
            print(json.dumps({"rows": rows, "csv_mib": round(csv_mib, 1), "reader": reader, "what": "builder",
                              "table_mib": round(table_mib, 1), **built,
                              "peak_over_csv": round(built["peak_rss_mib"] / csv_mib, 2),
                              "growth_over_csv": round(built["growth_mib"] / csv_mib, 2)}), flush=True)
            for p in work.glob(f"{target.name}*"):
                p.unlink()
            for rank in (0, 1):      # the table built by the check above; rank 0 first, then rank 1
                _, _, out = _timed([*me, "rank", "--reader", reader, "--file", str(csv_file), "--cache", str(cache),
                                    "--baseline", str(baseline)], env)
                print(json.dumps({"rows": rows, "reader": reader, "what": f"rank {rank}",
                                  **json.loads(out.splitlines()[-1])}), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
        if not args.keep:
            csv_file.unlink()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loader")
    lo.add_argument("--images", type=int, default=384)
    lo.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    lo.add_argument("--rounds", type=int, default=2)
    st = sub.add_parser("startup")
    st.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    st.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    st.add_argument("--formats", nargs="+", default=[".csv", ".parquet"])
    st.add_argument("--readers", nargs="+", default=["ours cold", "ours warm", "main"])
    ch = sub.add_parser("child")
    ch.add_argument("--reader", required=True)
    ch.add_argument("--file", required=True)
    ch.add_argument("--cache", required=True)
    ch.add_argument("--baseline", required=True)
    sub.add_parser("serve-images").add_argument("folder")
    me = sub.add_parser("memory")
    me.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    me.add_argument("--readers", nargs="+", default=["before", "after"])
    me.add_argument("--before", default=BEFORE_REV, help="the trainer to compare against (a git revision)")
    me.add_argument("--work", help="working folder (default: a new temporary one)")
    me.add_argument("--keep", action="store_true", help="keep the generated files")
    mc = sub.add_parser("mem-child")
    mc.add_argument("what_child", choices=["build", "rank", "check"])
    mc.add_argument("--reader", required=True)
    mc.add_argument("--baseline", required=True)
    mc.add_argument("--file")
    mc.add_argument("--target")
    mc.add_argument("--cache")
    mc.add_argument("--job")
    args = p.parse_args()
    {"loader": bench_loader, "startup": bench_startup, "child": child, "serve-images": serve_images,
     "memory": bench_memory, "mem-child": mem_child}[args.what](args)


if __name__ == "__main__":
    main()
