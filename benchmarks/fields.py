"""Cost of extra fields: samples/s of our training step with 1, 2 and 4 right fields.

The right side is the image plus 0, 1 or 3 text fields (all weighted > 0), the left side one
query text; the tiny model, batch 64, fp32, one process. Each extra right text field adds
one text-tower pass per row (batched with the query texts into one text-tower call). Rounds
alternate between the configurations (the CPU is shared and drifts); figures are medians
and best rounds, and the cost is relative to 1 field.

    python benchmarks/fields.py [--batch 64] [--steps 4] [--rounds 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import TINY, ensure_importable, machine, make_clip, median, our_batch, our_trainer, synthetic, timed  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    logging.disable(logging.INFO)
    ensure_importable()
    n = args.batch * args.steps
    images, tokens = synthetic(n, TINY, fields=4, seed=2)
    runners = {}
    for fields in (1, 2, 4):
        clip = make_clip(TINY, seed=0)
        step = our_trainer(clip, n_left=1, n_right=fields)
        batches = [our_batch(images[i * args.batch:(i + 1) * args.batch], tokens[i * args.batch:(i + 1) * args.batch, :1],
                             tokens[i * args.batch:(i + 1) * args.batch, 1:fields])
                   for i in range(args.steps)]

        def run(step=step, batches=batches):
            for b in batches:
                step([b])

        runners[fields] = run
    for run in runners.values():
        run()
    rates = {f: [] for f in runners}
    order = list(runners)
    for r in range(args.rounds):
        for f in (order if r % 2 == 0 else order[::-1]):
            rates[f].append(n / timed(runners[f]))
    print(f"machine: {machine()}")
    print(f"tiny ViT CLIP, batch {args.batch}, fp32, 1 left field; {args.rounds} rounds x {args.steps} steps")
    base_med, base_best = median(rates[1]), max(rates[1])
    for f, xs in rates.items():
        print(f"right fields {f} (image + {f - 1} text): median {median(xs):8.1f} samples/s "
              f"({median(xs) / base_med:.2f}x of 1 field), best {max(xs):8.1f} ({max(xs) / base_best:.2f}x)")


if __name__ == "__main__":
    main()
