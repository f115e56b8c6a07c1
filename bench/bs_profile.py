#!/usr/bin/env python3
"""Where a Backward Smoothing step's time goes: each piece timed on its own.

    python bench/bs_profile.py [--model=small_cnn] [--batch_size=128] [--modes=graph,xla]
                               [--repeats=5] [--trace=DIR] [--dtype_policy=float32]

Every piece is one ``tf.function`` (``jit_compile`` per mode) over the same
network and batch, timed ``--repeats`` times after a warm-up; the minimum is
printed (the least disturbed run: on a shared machine contention only adds
time). Pieces: forward in inference / training mode; an input-only backward
pass (forward + gradient w.r.t. the input, inference mode: one attack step);
a full backward pass (training-mode forward + gradients w.r.t. the weights:
one training pass); the BS attack; the BS objective + gradients on a given
``x'``; the whole per-replica step (``RobustModel._grads_and_stats``); the
optimizer update; and the whole Keras ``fit`` step. ``--trace`` also writes a
TensorBoard profile of 2 ``fit`` steps. ``--dtype_policy`` (e.g.
``mixed_bfloat16``) builds the network under that Keras policy, as
``bin/train --dtype_policy`` does.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import step_cost  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_backsmooth import attacks, fused_bn, methods, objectives  # noqa: E402


def best_time(fn, repeats, *args):
    fn(*args)  # trace / compile
    fn(*args)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        res = fn(*args)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, res)
        out.append(time.perf_counter() - start)
    return min(out)


def pieces(model_name, batch_size, jit, repeats):
    shape = step_cost.SHAPES[model_name]
    eps = step_cost.EPS[shape]
    model, ds = step_cost.build("backward_smoothing", model_name, batch_size, jit)
    base = model.base_model
    params = model.params
    x, y = next(iter(ds))
    seed = tf.constant([1, 2], tf.int32)
    wts = base.trainable_variables
    fn = lambda f: tf.function(f, jit_compile=jit)  # noqa: E731

    fwd_inf, input_backward, full_backward = step_cost.pass_fns(base)

    def fwd_train(x):
        with fused_bn.training_override(base):  # as RobustModel's step runs it
            return base(x, training=True)

    def bs_attack(x):
        return attacks.backward_smoothing_with_logits(
            lambda t: base(t, training=False), x, eps, params.step_size, 1.0, 1, seed=seed)

    x_adv = bs_attack(x)[0]

    def bs_objective(x, x_adv):
        train_fn = lambda t: base(t, training=True)  # noqa: E731
        with fused_bn.training_override(base), tf.GradientTape() as tape:
            terms = methods.trades_objective(
                train_fn, x, y, methods.AttackOutput(x_adv), params, seed)
            loss = objectives.replica_mean(terms.natural + terms.robust, None, 1)
        return tape.gradient(loss, wts)

    def rng_noise(x):
        return attacks.uniform_noise([batch_size, 10], 1.0, seed)

    step = model._get_step_fn()
    grads = step(x, y, None, seed, None)[0]

    @tf.function
    def apply(grads):
        model.optimizer.apply(grads, model.trainable_variables)
        return model.optimizer.iterations

    rows = [
        ("forward (inference)", fn(fwd_inf), (x,)),
        ("forward (training)", fn(fwd_train), (x,)),
        ("input-only backward pass", fn(input_backward), (x,)),
        ("full backward pass (training)", fn(full_backward), (x,)),
        ("RNG (logit noise)", fn(rng_noise), (x,)),
        ("BS attack", fn(bs_attack), (x,)),
        ("BS objective + gradients", fn(bs_objective), (x, x_adv)),
        ("per-replica step (_grads_and_stats)", lambda *a: step(*a)[0], (x, y, None, seed, None)),
        ("optimizer.apply (graph)", apply, (grads,)),
    ]
    result = {}
    for name, f, args in rows:
        result[name] = best_time(f, repeats, *args)
    fit_times = [step_cost.time_steps(model, ds, 3) for _ in range(max(2, repeats // 2))]
    result["Keras fit step"] = min(fit_times)
    return result, model, ds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small_cnn", choices=sorted(step_cost.SHAPES))
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--modes", default="graph,xla")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace", default=None)
    p.add_argument("--dtype_policy", default="float32",
                   choices=["float32", "mixed_bfloat16", "mixed_float16"])
    args = p.parse_args()
    keras.config.set_dtype_policy(args.dtype_policy)
    table = {}
    for mode in args.modes.split(","):
        table[mode], model, ds = pieces(args.model, args.batch_size, mode == "xla", args.repeats)
        print(f"[{mode}] done ({model.xla_reason})", file=sys.stderr, flush=True)
        if args.trace:
            tf.profiler.experimental.start(os.path.join(args.trace, mode))
            model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
            tf.profiler.experimental.stop()
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    modes = list(table)
    print(f"\n{args.model} batch {args.batch_size}, {args.dtype_policy}, min of "
          f"{args.repeats}, ms; {load}")
    print(f"{'piece':<40}" + "".join(f"{m:>10}" for m in modes))
    for name in table[modes[0]]:
        print(f"{name:<40}" + "".join(f"{table[m][name] * 1e3:>10.1f}" for m in modes))


if __name__ == "__main__":
    keras.config.disable_interactive_logging()
    main()
