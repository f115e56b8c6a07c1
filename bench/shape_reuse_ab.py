#!/usr/bin/env python3
"""AutoAttack with and without graph mode's batch-shape reuse, alternated in one process.

    python bench/shape_reuse_ab.py --model_path=RUN_DIR --dataset=fashion_mnist \
        --epsilon=0.1 [--num_examples=1000] [--batch_size=500] [--pairs=2]

``evaluation.REUSE_PAD`` (963be75) pads a graph-mode batch by up to 10 % to a
batch size its attack function already ran, because the fused element-wise
parts of the attacks (``attacks.fused``) are XLA clusters compiled once per
batch shape. This runs ``evaluate(..., attacks="autoattack")`` ``--pairs`` times
with ``REUSE_PAD = 0`` (off) and with its default (on), alternated (off, on,
off, on, ...), each time on a freshly loaded classifier (a new compiled-function
cache, so every run traces and compiles from scratch, as a one-off evaluation
does). Printed per run: seconds per stage, total, the number of batch shapes
each attack ran, and whether the per-example verdicts equal the first run's;
then the median total of each setting and the ratio off / on. Run it on a quiet
machine: the ratio is only meaningful within one run.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tf_backsmooth import data, evaluation  # noqa: E402

STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")


def one_run(args, x, y, reuse_pad):
    evaluation.REUSE_PAD = reuse_pad
    model = evaluation.load_classifier(args.model_path)  # fresh cache: compiles again
    report = evaluation.evaluate(model, x, y, args.epsilon, attacks="autoattack",
                                 batch_size=args.batch_size, per_example=True)
    eps = str(args.epsilon)
    stages = {s["attack"]: s["seconds"] for s in report["preset_stages"][eps]["autoattack"]}
    cache = evaluation._cache_for(model)
    shapes = {key[1]: len(sizes) for key, sizes in cache.items()
              if isinstance(key, tuple) and key and key[0] == "batch sizes"}
    return {"seconds": report["seconds"], "stages": stages, "shapes": shapes,
            "robust": report["robust_accuracy"],
            "verdicts": np.array(report["per_example"][eps]["autoattack"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--num_examples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--pairs", type=int, default=2)
    args = p.parse_args()
    if args.pairs < 1:
        raise SystemExit("--pairs must be >= 1")
    x, y = data.load_arrays(args.dataset, "test", args.data_dir, num_examples=args.num_examples)
    x = np.asarray(x, np.float32) / 255.0
    y = np.asarray(y, np.int64)
    default = evaluation.REUSE_PAD
    runs = []
    for _ in range(args.pairs):
        for name, pad in (("off", 0.0), ("on", default)):
            r = one_run(args, x, y, pad)
            r["name"] = name
            same = "-" if not runs else str(bool((r["verdicts"] == runs[0]["verdicts"]).all()))
            runs.append(r)
            print(f"run {len(runs)} reuse {name:>3}: {r['seconds']:7.1f} s  stages "
                  + " ".join(f"{s} {r['stages'].get(s, 0.0):5.1f}" for s in STAGES)
                  + f"  robust {100 * r['robust']:.1f} %  same verdicts as run 1: {same}"
                  + f"  shapes {r['shapes']}", flush=True)
    evaluation.REUSE_PAD = default
    off = statistics.median(r["seconds"] for r in runs if r["name"] == "off")
    on = statistics.median(r["seconds"] for r in runs if r["name"] == "on")
    print(f"median seconds: reuse off {off:.1f}, on {on:.1f}; off / on = {off / on:.3f} "
          f"({args.pairs} pair(s), {len(x)} images, batch {args.batch_size})")


if __name__ == "__main__":
    main()
