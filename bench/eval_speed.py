#!/usr/bin/env python3
"""Attack throughput: our PGD-20 and APGD-CE-100 against Foolbox 3's LinfPGD-20.

All attacks run in one process on the same small MNIST CNN (trained here for
2 epochs on 2000 examples) and the same test images, batch size, epsilon and
PGD step size (``2.5 * eps / steps``). Every measurement follows a warm-up
call on the same batch shapes (tracing / XLA compilation excluded) and is the
median of ``--repeats`` runs. Prints a table with images/s, gradient
evaluations/s and the ratio to Foolbox's images/s.

    python bench/eval_speed.py --data_dir=../shared/data/mnist

Rows "evaluate(...)" time the full :func:`tf_backsmooth.evaluation.evaluate`
(clean pass + attacking only the clean-correct examples, sanity checks), so
their images/s count every evaluated example.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # toy_cnn.py: the model test_evaluation.py attacks

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from toy_cnn import trained_small_cnn  # noqa: E402

from tf_backsmooth import data  # noqa: E402
from tf_backsmooth import evaluation as ev  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up: tracing / compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_foolbox", action="store_true")
    args = parser.parse_args()

    x, y = data.load_arrays("mnist", "train", data_dir=args.data_dir,
                            validation_size=0, num_examples=2000)
    xt, yt = data.load_arrays("mnist", "test", data_dir=args.data_dir,
                              num_examples=args.num_examples)
    x = np.asarray(x, np.float32) / 255.0
    xt = np.asarray(xt, np.float32) / 255.0
    model = trained_small_cnn(x, y)

    eps, bs, n = args.epsilon, args.batch_size, len(xt)
    pgd_size = 2.5 * eps / 20
    rows = []  # (name, steps, seconds, accuracy)

    def ours(attack, steps):
        def run():
            _, robust = ev.adversarial_examples(model, xt, yt, eps, attack, steps=steps,
                                                step_size=pgd_size if "pgd" in attack else None,
                                                batch_size=bs)
            return robust.mean()
        return run

    seconds, acc = timed(ours("pgd", 20), args.repeats)
    rows.append(("ours pgd (CE)", 20, seconds, acc))
    seconds, acc = timed(ours("apgd_ce", 100), args.repeats)
    rows.append(("ours apgd_ce", 100, seconds, acc))
    for jit in (False, True):
        def full(jit=jit):
            return ev.evaluate(model, xt, yt, eps, ("pgd",), batch_size=bs, pgd_steps=20,
                               step_size=pgd_size, jit_compile=jit)["robust_accuracy"]
        seconds, acc = timed(full, args.repeats)
        rows.append((f"evaluate(pgd{', XLA' if jit else ''})", 20, seconds, acc))

    foolbox_rate = None
    if not args.no_foolbox:
        try:
            import foolbox as fb
        except ImportError:
            print("foolbox not installed: pip install foolbox (skipping its row)")
        else:
            fmodel = fb.TensorFlowModel(model, bounds=(0, 1))
            attack = fb.attacks.LinfPGD(steps=20, abs_stepsize=pgd_size, random_start=True)

            def foolbox_run():
                success = []
                for b in range(0, n, bs):
                    _, _, s = attack(fmodel, tf.constant(xt[b:b + bs]),
                                     tf.constant(yt[b:b + bs]), epsilons=eps)
                    success.append(s.numpy())
                return 1.0 - np.concatenate(success).mean()

            seconds, acc = timed(foolbox_run, args.repeats)
            rows.append(("foolbox LinfPGD (CE)", 20, seconds, acc))
            foolbox_rate = n / seconds

    print(f"\n{n} MNIST test images, eps={eps}, batch {bs}, PGD step {pgd_size:.4f}, "
          f"median of {args.repeats}; TF {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| attack | steps | seconds | images/s | grad evals/s | vs foolbox PGD-20 | robust acc |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, steps, seconds, acc in rows:
        rate = n / seconds
        ratio = f"{rate / foolbox_rate:.2f}x" if foolbox_rate else "-"
        print(f"| {name} | {steps} | {seconds:.3f} | {rate:.0f} | {rate * steps:.0f} | "
              f"{ratio} | {100 * acc:.1f}% |")


if __name__ == "__main__":
    main()
