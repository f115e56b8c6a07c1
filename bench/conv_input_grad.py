#!/usr/bin/env python3
"""The input gradient of one convolution: oneDNN's kernel vs ``fastgrad``, one run.

    python bench/conv_input_grad.py [--reps=20] [--rounds=3]

For each convolution of the table (the first convolutions of SmallCNN,
``mnist_cnn`` and ResNet-18, and two deeper ones) it times, alternated round by
round, TensorFlow's ``Conv2DBackpropInput`` (oneDNN on this CPU),
``fastgrad.conv2d_input_grad`` in graph mode and under XLA, and the forward
convolution, and prints the median of ``--reps`` calls of the last round in
ms, with the largest relative difference from TensorFlow's gradient. This is
the measurement behind ``fastgrad.MAX_INPUT_CHANNELS`` (BUILD_NOTES.md, "Input
gradient of the first convolution").
"""

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_backsmooth import fastgrad  # noqa: E402

# name: (batch, H, W, C_in, C_out, kernel, stride, padding)
CONVS = {
    "SmallCNN conv1": (128, 28, 28, 1, 32, 3, 1, "VALID"),
    "mnist_cnn conv1 (padded)": (500, 30, 30, 1, 16, 4, 2, "VALID"),
    "ResNet-18 stem": (32, 32, 32, 3, 64, 3, 1, "SAME"),
    "SmallCNN conv2": (128, 26, 26, 32, 32, 3, 1, "VALID"),
    "ResNet-18 layer1": (32, 32, 32, 64, 64, 3, 1, "SAME"),
    "ResNet-18 layer3": (32, 8, 8, 256, 256, 3, 1, "SAME"),
    "ResNet-18 layer4 s2 (pad)": (32, 10, 10, 256, 512, 3, 2, "VALID"),
    "ResNet-18 layer4": (32, 4, 4, 512, 512, 3, 1, "SAME"),
}


def variants(b, h, w, ci, co, k, s, padding):
    rs = np.random.RandomState(0)
    x = tf.constant(rs.randn(b, h, w, ci).astype(np.float32))
    kernel = tf.constant(rs.randn(k, k, ci, co).astype(np.float32))
    dy = tf.constant(rs.randn(*tf.nn.conv2d(x, kernel, s, padding).shape).astype(np.float32))

    def onednn(g):
        return tf.raw_ops.Conv2DBackpropInput(input_sizes=x.shape, filter=kernel,
                                              out_backprop=g, strides=[1, s, s, 1],
                                              padding=padding)

    def fast(g):
        return fastgrad.conv2d_input_grad(g, kernel, (h, w), (s, s), padding)

    fns = {"tf input grad": (tf.function(onednn), dy),
           "fastgrad, graph": (tf.function(fast), dy),
           "fastgrad, XLA": (tf.function(fast, jit_compile=True), dy),
           "forward conv": (tf.function(lambda t: tf.nn.conv2d(t, kernel, s, padding)), x)}
    return fns, onednn(dy).numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--convs", default="",
                   help="comma-separated substrings of the table's names (default: all)")
    args = p.parse_args()
    wanted = [c for c in args.convs.split(",") if c]
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    cols = ["tf input grad", "fastgrad, graph", "fastgrad, XLA", "forward conv"]
    print(f"{'convolution':<26}{'batch':>6}" + "".join(f"{c:>17}" for c in cols)
          + f"{'max rel diff':>14}")
    for name, spec in CONVS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        fns, ref = variants(*spec)
        ms = {}
        for _ in range(args.rounds):
            for label, (fn, arg) in fns.items():
                fn(arg)
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    fn(arg).numpy()
                    times.append(time.perf_counter() - start)
                ms[label] = 1e3 * float(np.median(times))
        diff = max(float(np.abs(fns[k][0](fns[k][1]).numpy() - ref).max() / np.abs(ref).max())
                   for k in ("fastgrad, graph", "fastgrad, XLA"))
        print(f"{name:<26}{spec[0]:>6}" + "".join(f"{ms[c]:>17.2f}" for c in cols)
              + f"{diff:>14.1e}", flush=True)
    print("load average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
