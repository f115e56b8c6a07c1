#!/usr/bin/env python3
"""Training-step cost of every method, as ratios measured in one run.

    python bench/step_cost.py [--model=small_cnn] [--batch_size=128]
        [--modes=graph,xla,auto] [--steps=20] [--rounds=3] [--methods=...]

A mode is a ``jit_compile`` value: graph (False), xla (True), auto (the
package's rule, decided per method; the pass costs then use the mode the BS
step got).

For each (mode, method) a RobustModel is compiled and warmed up; then the
methods are timed in interleaved rounds (each round runs every method for
``--steps`` steps) so that slow drifts of the machine hit all methods alike.
The reported time is the median over rounds. Prints steps/s, ms/step, and the
ratio to ``natural`` in the same mode, plus the two headline ratios
TRADES-10 / BS and BS / natural, each next to its pass-count limit.

Pass-count limits. In each mode the script also times, on the same network
and batch, a forward pass ``f`` (inference mode), an input-only backward pass
``a`` (inference-mode forward + gradient w.r.t. the input: one attack step)
and a full backward pass ``T`` (training-mode forward + gradients w.r.t. the
weights: one training pass), each the minimum over ``--pass_repeats`` calls of
its own ``tf.function``. The steps consist of these passes:

* natural = ``T``; BS = ``2a + 2T`` (backward step + 1 TRADES step, training
  passes on ``x`` and ``x'``), so BS / natural >= ``2 + 2a/T``;
* TRADES-10 = ``f + 10a + 2T``, so TRADES-10 / BS ~ ``(f + 10a + 2T) /
  (2a + 2T)``: the ratio a perfect implementation of both steps would show
  (the time a step spends outside these passes moves the measured ratio
  towards 1).

``--json`` writes the table.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_backsmooth import data, fastgrad, fused_bn, methods, models  # noqa: E402
from tf_backsmooth.robust_model import RobustModel  # noqa: E402

SHAPES = {"small_cnn": (28, 28, 1), "mnist_cnn": (28, 28, 1), "mlp": (28, 28, 1),
          "preact_resnet18": (32, 32, 3), "resnet18": (32, 32, 3),
          "wide_resnet": (32, 32, 3)}
EPS = {(28, 28, 1): 0.3, (32, 32, 3): 8 / 255}
JIT = {"graph": False, "xla": True, "auto": "auto"}


def bench_dataset(x, y, batch_size):
    """An in-memory, endlessly repeated batch pipeline for timing ``fit`` calls.

    Finished by ``data.finish_pipeline`` (tf.data autotuning off): with it on,
    the end of each timed ``fit`` waited for the autotune thread's next
    wake-up, so fits of 2.6 s measured 5.11 s and ones of ~10 s 20.47 s here
    (BUILD_NOTES.md, "Benchmark pitfall: tf.data autotune").
    """
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True)
    return data.finish_pipeline(ds.cache().repeat())


def build(method, model_name, batch_size, jit):
    shape = SHAPES[model_name]
    keras.utils.set_random_seed(0)
    base = models.get(model_name, 10, shape)
    kw = {} if method == "natural" else {"epsilon": EPS[shape]}
    if method in ("pgd_at", "trades"):
        kw["steps"] = 10
    model = RobustModel(base, method=method, **kw)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit)
    rs = np.random.RandomState(0)
    x = rs.rand(batch_size * 4, *shape).astype(np.float32)
    y = rs.randint(0, 10, batch_size * 4)
    ds = bench_dataset(x, y, batch_size)
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace + warm up
    return model, ds


def pass_fns(base):
    """The three passes of ``base``: forward (inference), input-only backward
    (gradient of the summed logits w.r.t. the input, taken as the attacks take
    it: under ``fastgrad.input_gradient_override``) and full backward
    (training mode, gradient w.r.t. every trainable weight, with BatchNorm
    fused as ``RobustModel``'s step runs it: ``fused_bn.training_override``)."""
    weights = base.trainable_variables

    def forward(x):
        return base(x, training=False)

    def input_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = tf.reduce_sum(base(x, training=False))
        with fastgrad.input_gradient_override():  # as attacks.input_gradient does
            return tape.gradient(out, x)

    def full_backward(x):
        with fused_bn.training_override(base):  # as RobustModel's step runs it
            with tf.GradientTape() as tape:
                out = tf.reduce_sum(base(x, training=True))
            return tape.gradient(out, weights)

    return forward, input_backward, full_backward


def pass_costs(model_name, batch_size, jit, repeats=5):
    """Seconds of one forward ``f``, input-only backward ``a`` and full
    backward ``T`` pass (see the module docstring), minimum over ``repeats``."""
    shape = SHAPES[model_name]
    keras.utils.set_random_seed(0)
    base = models.get(model_name, 10, shape)
    x = tf.constant(np.random.RandomState(0).rand(batch_size, *shape).astype(np.float32))
    forward, input_backward, full_backward = pass_fns(base)

    costs = {}
    for name, fn in (("f", forward), ("a", input_backward), ("T", full_backward)):
        fn = tf.function(fn, jit_compile=jit)
        tf.nest.map_structure(lambda t: t.numpy(), fn(x))  # trace, compile, warm up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn(x))
            runs.append(time.perf_counter() - start)
        costs[name] = min(runs)
    return costs


def limits(costs):
    """Pass-count limits of BS / natural and TRADES-10 / BS from ``pass_costs``."""
    f, a, t = costs["f"], costs["a"], costs["T"]
    return {"bs_over_natural": 2 + 2 * a / t,
            "trades10_over_bs": (f + 10 * a + 2 * t) / (2 * a + 2 * t)}


def time_steps(model, ds, steps):
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn", choices=sorted(SHAPES))
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--modes", default="graph,xla")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(methods.names()))
    p.add_argument("--pass_repeats", type=int, default=5,
                   help="timed calls per pass for the pass-count limits (0: skip)")
    p.add_argument("--json", default=None)
    p.add_argument("--fastgrad", choices=("on", "off"), default="on",
                   help="off: the attacks use TensorFlow's own Conv2D input gradient "
                        "(tf_backsmooth.fastgrad.ENABLED = False)")
    p.add_argument("--fused_bn", choices=("on", "off"), default="on",
                   help="off: Keras' unfused training-mode BatchNorm "
                        "(tf_backsmooth.fused_bn.ENABLED = False)")
    args = p.parse_args()
    fastgrad.ENABLED = "auto" if args.fastgrad == "on" else False
    fused_bn.ENABLED = "auto" if args.fused_bn == "on" else False
    names = args.methods.split(",")
    if "natural" not in names:
        names.insert(0, "natural")
    table, passes = {}, {}
    for mode in args.modes.split(","):
        built = {n: build(n, args.model, args.batch_size, JIT[mode]) for n in names}
        if args.pass_repeats > 0:
            jit = JIT[mode]
            if jit == "auto":
                jit = built.get("backward_smoothing", built[names[0]])[0].xla
            passes[mode] = pass_costs(args.model, args.batch_size, jit, args.pass_repeats)
        times = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names:
                times[n].append(time_steps(*built[n], args.steps))
            print(f"[{mode}] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        table[mode] = {n: statistics.median(t) for n, t in times.items()}
    print(f"\nmodel={args.model} batch={args.batch_size} steps={args.steps} "
          f"rounds={args.rounds} TF {tf.__version__}, {os.cpu_count()} CPUs")
    for mode, row in table.items():
        print(f"\n{mode}:\n{'method':<20}{'ms/step':>10}{'steps/s':>10}{'x natural':>11}")
        for n, sec in row.items():
            print(f"{n:<20}{sec * 1e3:>10.1f}{1 / sec:>10.2f}{sec / row['natural']:>11.2f}")
        lim = limits(passes[mode]) if mode in passes else None
        if lim:
            c = passes[mode]
            print(f"passes (ms): forward f {c['f'] * 1e3:.1f}, input-only backward a "
                  f"{c['a'] * 1e3:.1f}, full backward T {c['T'] * 1e3:.1f}")
        if "trades" in row and "backward_smoothing" in row:
            print(f"TRADES-10 / BS  = {row['trades'] / row['backward_smoothing']:.2f}"
                  + (f"   (pass-count limit (f + 10a + 2T) / (2a + 2T) = "
                     f"{lim['trades10_over_bs']:.2f})" if lim else ""))
        if "backward_smoothing" in row:
            print(f"BS / natural    = {row['backward_smoothing'] / row['natural']:.2f}"
                  + (f"   (pass-count limit 2 + 2a/T = {lim['bs_over_natural']:.2f})"
                     if lim else ""))
    if "graph" in table and "xla" in table:
        print("\nXLA / graph time per step:")
        for n in names:
            print(f"  {n:<20}{table['xla'][n] / table['graph'][n]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds_per_step": table,
                       "pass_seconds": passes,
                       "limits": {m: limits(c) for m, c in passes.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
