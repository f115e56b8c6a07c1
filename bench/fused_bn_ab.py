#!/usr/bin/env python3
"""Training step with fused vs Keras' training-mode BatchNorm, one process, alternated.

    python bench/fused_bn_ab.py [--model=resnet18] [--batch_size=32]
                                [--methods=natural,backward_smoothing] [--rounds=10]

For each method two RobustModels are built on the same network and batch
(``step_cost.build``, graph mode): one traced with ``tf_backsmooth.fused_bn``
on, one with it off (Keras' ``tf.nn.moments`` + ``tf.nn.batch_normalization``).
Their per-replica step functions (``RobustModel._grads_and_stats``: attack,
objective and gradients, no ``fit`` overhead) are then called in alternated
rounds on the same batch, and the median and minimum per step are printed with
the ratio keras / fused (> 1: fusing is faster). One process and alternation,
because this VM's timings drift by about 10 % from run to run.
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
import step_cost  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_backsmooth import fused_bn  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(step_cost.SHAPES))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--methods", default="natural,backward_smoothing")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    fns = {}
    for method in args.methods.split(","):
        for fused in (True, False):
            fused_bn.ENABLED = fused  # read while tracing
            model, ds = step_cost.build(method, args.model, args.batch_size, False)
            x, y = next(iter(ds))
            fn = tf.function(model._grads_and_stats)  # pylint: disable=protected-access
            call = (x, y, None, tf.constant([1, 2], tf.int32), None)
            fn(*call)  # trace
            fns[method, fused] = (fn, call)
    fused_bn.ENABLED = "auto"
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            fn, call = fns[key]
            start = time.perf_counter()
            grads, _ = fn(*call)
            grads[0].numpy()
            times[key].append(time.perf_counter() - start)
    print(f"{args.model} batch {args.batch_size}, {args.rounds} alternated rounds, per-replica "
          f"step, graph mode; load average %.2f %.2f %.2f" % os.getloadavg())
    for method in args.methods.split(","):
        k, f = times[method, False], times[method, True]
        print(f"{method:<20} keras BN median {statistics.median(k) * 1e3:7.1f} ms "
              f"(min {min(k) * 1e3:7.1f}), fused median {statistics.median(f) * 1e3:7.1f} ms "
              f"(min {min(f) * 1e3:7.1f}); keras / fused "
              f"{statistics.median(k) / statistics.median(f):.3f}")


if __name__ == "__main__":
    keras.config.disable_interactive_logging()
    main()
