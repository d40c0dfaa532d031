"""GPU benchmark, sized for one short run (< 5 minutes) on one H100 or H200.

Sections (random initialisation everywhere: no downloads):
  1. model-only: ViT-B-32 and ViT-B-16 at amp_bf16 through our training step (FusedModel,
     gathered weighted loss, fused AdamW) on GPU-resident synthetic tensors: samples/s and
     MFU = model FLOPs per step (torch.utils.flop_counter.FlopCounterMode over one
     forward+backward) x steps/s / peak bf16 FLOP/s (989.4 TFLOP/s for H100 SXM and H200,
     756 for H100 PCIe; override with --peak-tflops). ViT-B-16 also under torch.compile.
  2. ours vs open_clip_train.train_one_epoch on ViT-B-32 (benchmarks/throughput.py).
  3. dynamicBatchSize: the real CUDA probe (OOM -> halve -> bisect) for ViT-B-16 on a
     16384-row step.
  4. end to end: ViT-B-32 `kontrast.trainer.run.train.train` on synthetic 256 px JPEGs through
     our data pipeline (decode, RandomResizedCrop, tokenise, DataLoader workers) with
     dynamicBatchSize on, against the data pipeline alone and the model-only figure: the
     pipeline is not the bottleneck when its samples/s is well above the model's.

    python benchmarks/gpu.py                 # on the GPU machine
    python benchmarks/gpu.py --smoke         # a few seconds on CPU, tiny sizes: checks the script

GPU machine set-up (its image lacks open_clip_torch, ftfy and wcwidth; it has no network):
on a machine with PyPI, ``pip download --no-deps open_clip_torch==3.3.0 ftfy wcwidth -d .whl``,
then on the GPU ``pip install --no-deps .whl/*.whl`` and run from the repository root.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (ROOT, TINY, ensure_importable, machine, make_clip, model_config, our_batch,  # noqa: E402
                    our_trainer, sync, synthetic)

PEAKS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0}


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name()
    for key in ("H100 PCIe", "GH200", "H200", "H100", "A100", "L40S"):
        if key in name or (key == "H100 PCIe" and "H100" in name and "PCIe" in name):
            return PEAKS[key]
    return float("nan")


def step_flops(step, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step([batch])
    return float(counter.get_total_flops())


def measure(step, batches, device, warmup: int = 3, seconds: float = 6.0) -> float:
    """Steady-state samples/s: warm-up steps, then whole passes over batches for ~seconds."""
    for b in batches[:warmup]:
        step([b])
    sync(device)
    rows, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            step([b])
            rows += b["weight"].shape[0]
        sync(device)
        if time.perf_counter() - t0 >= seconds:
            return rows / (time.perf_counter() - t0)


def model_only(name: str, args, compile_model: bool = False) -> dict:
    cfg = TINY if args.smoke else model_config(name)
    batch = 8 if args.smoke else args.batch
    clip = make_clip(cfg, seed=0, device=args.device)
    step = our_trainer(clip, precision_name=args.precision, device=args.device, lr=1e-5)
    images, tokens = synthetic(batch * 4, cfg, fields=1, seed=1, device=args.device)
    batches = [our_batch(images[i * batch:(i + 1) * batch], tokens[i * batch:(i + 1) * batch], device=args.device)
               for i in range(4)]
    flops = step_flops(step, batches[0])
    if compile_model:
        clip.encode_image = torch.compile(clip.encode_image)
        clip.encode_text = torch.compile(clip.encode_text)
        t = time.perf_counter()
        step([batches[0]])
        sync(args.device)
        compile_s = time.perf_counter() - t
    rate = measure(step, batches, args.device, seconds=1.0 if args.smoke else args.seconds)
    peak = peak_tflops(args)
    out = {"model": name + (" (torch.compile)" if compile_model else ""), "batch": batch,
           "samples_per_s": rate, "gflop_per_sample": flops / batch / 1e9,
           "mfu": rate * flops / batch / (peak * 1e12) if peak == peak else None}
    if compile_model:
        out["compile_s"] = compile_s
    if args.device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del clip, step, batches, images, tokens
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def print_model_only(r: dict) -> None:
    mfu = f"{100 * r['mfu']:.1f}% MFU" if r["mfu"] is not None else "MFU n/a (no peak for this device)"
    extra = f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
    mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    print(f"model-only {r['model']:<28} batch {r['batch']}: {r['samples_per_s']:9.1f} samples/s, "
          f"{r['gflop_per_sample']:.1f} GFLOP/sample (fwd+bwd), {mfu}{mem}{extra}", flush=True)


def dynamic_probe(args) -> None:
    """micro_batch.probe_micro_batch with the real cuda_probe on ViT-B-16."""
    ensure_importable()
    from kontrast.trainer.model.fusion import FusedModel
    from kontrast.trainer.step.micro_batch import cuda_probe, param_bytes, probe_micro_batch
    from kontrast.trainer.precision import resolve_precision

    cfg = TINY if args.smoke else model_config("ViT-B-16")
    rows = 64 if args.smoke else args.probe_rows
    dev = torch.device(args.device)
    precision = resolve_precision(args.precision, dev.type)
    clip = make_clip(cfg, seed=0, device=dev)
    fused = FusedModel(clip, [True], [True], input_dtype=precision.input_dtype).to(dev).train()
    images, tokens = synthetic(64, cfg, fields=1, seed=3, device=dev)
    sample = our_batch(images, tokens, device=dev)
    probes = []

    def forward_rows(m):
        probes.append(m)
        pick = torch.arange(m, device=dev) % 64
        b = {k: v[pick] for k, v in sample.items()}
        with precision.autocast():
            return fused(b["left_tokens"], b["left_weights"], b["image"], b["right_tokens"], b["right_weights"])[:3]

    def smoke_fits(step, device, reserve):
        return lambda m: (step(m), m <= 24)[1]

    t = time.perf_counter()
    micro = probe_micro_batch(rows, forward_rows, fused, dev,
                              optimizer_bytes=2 * param_bytes(p for p in clip.parameters() if p.requires_grad),
                              fits_factory=smoke_fits if args.smoke else cuda_probe)
    print(f"dynamicBatchSize probe {'tiny' if args.smoke else 'ViT-B-16'} {args.precision}, step of {rows} rows: "
          f"micro-batch {micro} ({rows // micro} micro-steps), probed sizes {probes}, "
          f"{time.perf_counter() - t:.1f} s", flush=True)


def write_images(folder: Path, n_images: int, size: int) -> list[str]:
    """Smooth colour gradients with shapes and mild noise, as JPEG (decode cost like photos)."""
    from PIL import Image, ImageDraw, ImageFilter

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    names = []
    for i in range(n_images):
        c0 = [rng.randrange(256) for _ in range(3)]
        c1 = [rng.randrange(256) for _ in range(3)]
        img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        img = Image.merge("RGB", [ch.point(lambda v, a=c0[k], b=c1[k]: a + (b - a) * v // 255)
                                  for k, ch in enumerate(img.split())])
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.randrange(size), rng.randrange(size)
            r = rng.randrange(8, size // 3)
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
        img = img.filter(ImageFilter.GaussianBlur(1))
        name = f"images/{i:05d}.jpg"
        img.save(folder / name, quality=90)
        names.append(name)
    return names


def defaulted(obj: dict) -> dict:
    """The CRD's defaults, as `kontrast validate` applies them (a minimal fallback when the
    API package's validators are not installed on the GPU machine)."""
    try:
        from kontrast.api import apply_defaults

        return apply_defaults(obj)
    except ImportError:
        import yaml

        crd = yaml.safe_load((ROOT / "crds" / "trainjob.yaml").read_text())
        props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        spec = {k: v["default"] for k, v in props.items() if "default" in v}
        spec.update(obj["spec"])
        return {**obj, "spec": spec}


def end_to_end(args, model_only_rate: float | None) -> None:
    ensure_importable()
    from kontrast.trainer.data.dataset import PairDataset, collate
    from kontrast.trainer.data.examples import load_examples
    from kontrast.trainer.model.build import build_model
    from kontrast.trainer.precision import resolve_precision
    from kontrast.trainer.report.reporters import JsonlReporter
    from kontrast.trainer.spec import resolve
    from kontrast.trainer.run.train import train

    rows = 64 if args.smoke else args.e2e_rows
    batch = 8 if args.smoke else args.batch
    workers = 2 if args.smoke else args.workers
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        t = time.perf_counter()
        names = write_images(folder / "data", 64 if args.smoke else 1024, 64 if args.smoke else 256)
        rng = random.Random(1)
        with open(folder / "data" / "train.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "image", "title", "score"])
            for i in range(rows):
                w.writerow([f"query {rng.randrange(10 ** 6)} item", names[i % len(names)], f"title {i}", 1 + i % 3])
        gen_s = time.perf_counter() - t
        model = "ViT-B-32"
        if args.smoke:
            (folder / "tiny-vit.json").write_text(json.dumps(TINY))
            model = str(folder / "tiny-vit.json")
        obj = defaulted({"apiVersion": "kontrast.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "e2e"},
                         "spec": {"model": model, "trainData": str(folder / "data" / "train.csv"),
                                  "output": str(folder / "out"), "leftKeys": ["query"], "leftWeights": [1.0],
                                  "rightKeys": ["image"], "rightWeights": [1.0], "weightKey": "score",
                                  "batchSize": batch, "epochs": 1, "warmup": 1, "lr": 1e-5,
                                  "precision": args.precision, "gradCheckpointing": False,
                                  "dynamicBatchSize": True, "workers": workers,
                                  "contextLength": 16 if args.smoke else 77}})
        resolved = resolve(obj, folder / "trainjob.yaml")

        # the data pipeline alone, same dataset / workers / collate as the trainer
        precision = resolve_precision(args.precision, args.device)
        bundle = build_model(resolved, precision, "cpu")
        ds = PairDataset(load_examples(resolved.params.train_data, resolved.params), bundle.preprocess_train,
                         bundle.tokenizer, bundle.image_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                                             pin_memory=args.device == "cuda", drop_last=True)
        it = iter(loader)
        next(it)
        t, n = time.perf_counter(), 0
        for b in it:
            n += b["weight"].shape[0]
        pipeline_rate = n / (time.perf_counter() - t) if n else float("nan")
        del bundle, ds, loader, it

        t = time.perf_counter()
        train(resolved, device=args.device, reporters=[JsonlReporter(str(folder / "out" / "progress.jsonl"))])
        wall = time.perf_counter() - t
        events = [json.loads(x) for x in (folder / "out" / "progress.jsonl").read_text().splitlines()]
        steps = [e for e in events if e["event"] == "step"]
        start = next(e for e in events if e["event"] == "start")
        rate = steps[-1]["samplesPerSecond"]
        print(f"end-to-end {('tiny' if args.smoke else 'ViT-B-32')} {args.precision}, batch {batch}, {workers} workers, "
              f"{rows} rows of {'64' if args.smoke else '256'} px JPEG ({gen_s:.0f} s to write): trainer "
              f"{rate:.1f} samples/s (mean step time after the first), {len(steps)} steps, {wall:.0f} s wall "
              f"incl. start-up; micro-batch chosen by dynamicBatchSize: {start['resolved']['microBatchSize']} "
              f"(accumSteps {start['resolved']['accumSteps']})", flush=True)
        print(f"data pipeline alone (decode + crop + tokenise, {workers} workers): {pipeline_rate:.1f} samples/s",
              flush=True)
        if model_only_rate:
            print(f"end-to-end / model-only: {rate / model_only_rate:.2f}; pipeline / model-only: "
                  f"{pipeline_rate / model_only_rate:.2f} (the pipeline is the bottleneck if this is below ~1.2)",
                  flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: check the script in seconds")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--precision", default="amp_bf16")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per model-only figure")
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--probe-rows", type=int, default=16384)
    p.add_argument("--e2e-rows", type=int, default=12288)
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--skip", default="", help="comma-separated sections to skip: model,compare,probe,e2e")
    args = p.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    skip = set(filter(None, args.skip.split(",")))
    logging.basicConfig(level=logging.WARNING)
    ensure_importable()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    print(f"machine: {machine(args.device)}; peak bf16 {peak_tflops(args)} TFLOP/s assumed", flush=True)
    b32 = None
    if "model" not in skip:
        for name in ("ViT-B-32", "ViT-B-16"):
            r = model_only(name, args)
            print_model_only(r)
            if name == "ViT-B-32":
                b32 = r["samples_per_s"]
        if not args.no_compile and not args.smoke:
            print_model_only(model_only("ViT-B-16", args, compile_model=True))
    if "compare" not in skip:
        import throughput

        targs = (["--rounds", "2", "--steps", "2", "--batch", "8"] if args.smoke else
                 ["--device", "cuda", "--model", "ViT-B-32", "--precision", args.precision, "--batch", "256",
                  "--steps", "5", "--rounds", "6"])
        throughput.main(targs)
    if "probe" not in skip:
        dynamic_probe(args)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "e2e" not in skip:
        end_to_end(args, b32)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
