"""Scaling on CPU: 1 process against 2 gloo processes (DDP, gathered loss).

batchSize is per process, so 2 processes train a global batch twice as large per step
(weak scaling). Configurations, each in fresh processes:
  1 process x 1 thread, 1 process x 2 threads (the whole 2-core machine),
  2 processes x 1 thread (what torchrun runs: it sets OMP_NUM_THREADS=1),
  2 independent processes x 1 thread, no DDP (what the machine gives two processes at all:
  the gap to it is the cost of the gradient all-reduce and the feature gather).
Samples/s counts every process's rows; efficiency = samples/s of 2 processes / (2 x samples/s
of 1 process x 1 thread). Each configuration takes the best of several timed windows (the
CPU is shared and drifts).

    python benchmarks/scaling.py [--batch 64] [--steps 6] [--windows 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import TINY, ensure_importable, machine, make_clip, median, our_batch, our_trainer, synthetic  # noqa: E402


def _worker(rank: int, world_size: int, threads: int, independent: bool, port: int, batch: int, steps: int,
            windows: int, out: str):
    logging.disable(logging.INFO)
    torch.set_num_threads(threads)
    ensure_importable()
    from kontrast.trainer.distributed import World, init_from_env, shutdown

    if world_size > 1 and not independent:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        world = init_from_env(device="cpu")
    else:
        world = World()
    images, tokens = synthetic(batch * steps, TINY, fields=1, seed=10 + rank)
    batches = [our_batch(images[i * batch:(i + 1) * batch], tokens[i * batch:(i + 1) * batch]) for i in range(steps)]
    step = our_trainer(make_clip(TINY, seed=0), world=world)
    for b in batches[:2]:
        step([b])
    rates = []
    for _ in range(windows):
        world.barrier()
        t = time.perf_counter()
        for b in batches:
            step([b])
        world.barrier()
        rates.append(world_size * batch * steps / (time.perf_counter() - t))
    allreduce_ms = None
    if world.world_size > 1:  # what DDP moves per step: one all-reduce of every gradient
        import torch.distributed as dist

        n = sum(p.numel() for p in step.params if p.requires_grad)
        buf = torch.zeros(n)
        times = []
        for _ in range(5):
            world.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t)
        allreduce_ms = (min(times) * 1e3, n * 4 / 1e6)
    torch.save({"rates": rates, "allreduce": allreduce_ms}, f"{out}.{rank}")
    if world.world_size > 1:
        shutdown()


def run(world_size: int, threads: int, independent: bool, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rates.pt")
        mp.spawn(_worker, args=(world_size, threads, independent, port, args.batch, args.steps, args.windows, out),
                 nprocs=world_size, join=True)
        got = [torch.load(f"{out}.{r}") for r in range(world_size)]
        if independent:  # each process timed its own windows: add their rates (each counted itself only)
            got[0]["rates"] = [sum(r["rates"][i] for r in got) / world_size for i in range(args.windows)]
        return got[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="rows per process per step")
    p.add_argument("--steps", type=int, default=6, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="times each configuration is launched (interleaved)")
    args = p.parse_args(argv)
    configs = [(1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True)]
    rates = {c: [] for c in configs}
    allreduce = []
    for _ in range(args.repeats):
        for c in configs:
            got = run(*c, args)
            rates[c] += got["rates"]
            if got["allreduce"]:
                allreduce.append(got["allreduce"])
    print(f"machine: {machine()}")
    print(f"tiny ViT CLIP, batch {args.batch} per process, fp32, ce loss gathered over processes, "
          f"{args.repeats} launches x {args.windows} windows x {args.steps} steps")
    best = {c: max(v) for c, v in rates.items()}
    for (w, t, ind), v in rates.items():
        what = "independent, no DDP" if ind else ("DDP, gloo" if w > 1 else "")
        print(f"{w} process(es) x {t} thread(s) {what:>20}: best {max(v):8.1f} samples/s, median {median(v):8.1f}")
    one, two, ind, threads2 = (1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False)
    print(f"efficiency 2 processes vs 2 x (1 process x 1 thread): best {best[two] / (2 * best[one]):.2f}, "
          f"median {median(rates[two]) / (2 * median(rates[one])):.2f}")
    print(f"  of which the machine (2 independent processes vs 2 x 1): best {best[ind] / (2 * best[one]):.2f}, "
          f"median {median(rates[ind]) / (2 * median(rates[one])):.2f}; DDP vs independent: "
          f"best {best[two] / best[ind]:.2f}, median {median(rates[two]) / median(rates[ind]):.2f}")
    print(f"speed-up 2 processes vs 1 process x 2 threads: best {best[two] / best[threads2]:.2f}, "
          f"median {median(rates[two]) / median(rates[threads2]):.2f}")
    ms, mb = min(a[0] for a in allreduce), allreduce[0][1]
    step_ms = 1e3 * 2 * args.batch / best[two]
    print(f"gloo all-reduce of all gradients ({mb:.1f} MB fp32): {ms:.1f} ms of a {step_ms:.1f} ms step "
          f"(2 processes, best window)")


if __name__ == "__main__":
    main()
