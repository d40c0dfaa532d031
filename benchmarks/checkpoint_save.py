"""How long a checkpoint save takes: what a pod's terminationGracePeriodSeconds must allow.

A stopped pod (SIGTERM) finishes its current optimizer step and then writes one resumable
checkpoint (weights + AdamW state, ~12 bytes per trainable fp32 parameter) before it exits.
This times ``checkpoint.save_resumable`` for a real open_clip architecture (random weights,
AdamW state filled by one step) to a local folder (a PVC's stand-in) and, when given, an
fsspec URL (e.g. s3://bucket/prefix with AWS_* in the environment), and prints seconds and
MB/s. Usage: python benchmarks/checkpoint_save.py [--model ViT-B-32] [--url s3://b/p]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import ensure_importable


def full_payload(model_name: str) -> dict:
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()                                   # allocates exp_avg and exp_avg_sq
    return {"epoch": 0, "epoch_step": 1, "step": 1, "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict()}


def time_save(output: str, payload: dict) -> tuple[float, int]:
    from kontrast.trainer.run import checkpoint as ckpt
    from kontrast.trainer import storage

    t0 = time.perf_counter()
    location = ckpt.save_resumable(output, payload)
    seconds = time.perf_counter() - t0
    with storage.open_read(location) as f:
        size = f.seek(0, 2)
    storage.delete(location)
    return seconds, size


def main() -> None:
    ensure_importable()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--url", help="an fsspec output URL to time as well")
    args = parser.parse_args()
    payload = full_payload(args.model)
    with tempfile.TemporaryDirectory() as folder:
        targets = [("local folder", folder)] + ([("url", args.url)] if args.url else [])
        for label, output in targets:
            seconds, size = time_save(output, payload)
            print(f"{args.model} resumable checkpoint, {label}: {size / 1e6:.0f} MB in {seconds:.1f} s "
                  f"({size / 1e6 / seconds:.0f} MB/s)", flush=True)


if __name__ == "__main__":
    main()
