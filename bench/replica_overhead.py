#!/usr/bin/env python3
"""Overhead of 2 replicas (MirroredStrategy on 2 logical CPUs) versus 1 device.

    python bench/replica_overhead.py [--method=backward_smoothing] [--steps=20] [--rounds=3]

Same model (SmallCNN), same global batch (128), same number of steps; the two
set-ups are timed in interleaved rounds in one process and the median ms/step
and the ratio are printed. On a CPU both logical devices share the same cores,
so this measures the distribution machinery's cost (splitting the batch,
all-reduce, per-replica dispatch), not a speed-up.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from step_cost import bench_dataset  # noqa: E402  (tf.data autotune off: see there)

from tf_backsmooth import distribute, models  # noqa: E402
from tf_backsmooth.robust_model import RobustModel  # noqa: E402


def build(strategy, method, batch):
    rs = np.random.RandomState(0)
    x = rs.rand(batch * 4, 28, 28, 1).astype(np.float32)
    y = rs.randint(0, 10, batch * 4)
    ds = bench_dataset(x, y, batch)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = models.get("small_cnn", 10, (28, 28, 1))
        kw = {} if method == "natural" else {"epsilon": 0.1}
        model = RobustModel(base, method=method, **kw)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=False)
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
    return model, ds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="backward_smoothing")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    two = distribute.get_strategy("mirrored", num_cpu_devices=2)
    setups = {"1 device": build(tf.distribute.get_strategy(), args.method, args.batch_size),
              "2 replicas": build(two, args.method, args.batch_size)}
    times = {k: [] for k in setups}
    for _ in range(args.rounds):
        for name, (model, ds) in setups.items():
            start = time.perf_counter()
            model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"method={args.method} model=small_cnn global batch={args.batch_size} "
          f"steps={args.steps} rounds={args.rounds}")
    for name, sec in med.items():
        print(f"{name:<12}{sec * 1e3:8.1f} ms/step")
    print(f"2 replicas / 1 device = {med['2 replicas'] / med['1 device']:.2f}")


if __name__ == "__main__":
    main()
