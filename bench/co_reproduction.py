#!/usr/bin/env python3
"""Catastrophic overfitting of FGSM-RS on MNIST, with and without COGuard.

    python bench/co_reproduction.py run --name=fgsm_rs
    python bench/co_reproduction.py run --name=fgsm_rs_guard
    python bench/co_reproduction.py run --name=backward_smoothing
    python bench/co_reproduction.py plot

``run`` trains one configuration (see RUNS) with the Python API
(``train_lib.train_dataset`` batches, ``RobustModel``, ``COGuard``) and writes
``<out>/<name>.json``: per-epoch clean and PGD-20 test accuracy (first
``--test_examples`` test images, ``evaluation.evaluate``), per-epoch FGSM test
accuracy, the guard's events and measurements, wall time and gradient
evaluations. A ``monitor`` guard (rule never fires, policy none) logs the
fixed-batch PGD/FGSM accuracies of the unguarded runs too, so every run has
the same within-epoch view. ``plot`` draws docs/co_guard_curves.png and
prints the markdown table of docs/CO_GUARD.md.

Run the configurations one at a time (2-core machine).
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = dict(dataset="mnist", model="mnist_cnn", epsilon=0.3, epochs=4,
              batch_size=128, lr=1e-3, lr_schedule="constant",
              num_train_examples=None, seed=0)
RUNS = {
    # FGSM-RS with the large step of Wong et al.'s failure case: 1.25 * eps.
    "fgsm_rs": dict(method="fgsm_rs", step_size=0.375, guard=None),
    # The guard with the rule for runs that are never robust (no drop to
    # see): PGD <= 0.05 and FGSM - PGD > 0.5; then switch / shrink.
    "fgsm_rs_guard": dict(method="fgsm_rs", step_size=0.375,
                          guard="switch_method"),
    "fgsm_rs_guard_shrink": dict(method="fgsm_rs", step_size=0.375,
                                 guard="shrink_step"),
    "backward_smoothing": dict(method="backward_smoothing", step_size=None,
                               guard=None),
}


def run(args):
    import keras
    import numpy as np

    from tf_backsmooth import data as data_lib
    from tf_backsmooth import evaluation, models, train_lib
    from tf_backsmooth.co_guard import COGuard
    from tf_backsmooth.robust_model import RobustModel

    spec = {**COMMON, **RUNS[args.name]}
    for key in ("epochs", "num_train_examples", "lr", "seed", "step_size",
                "lr_schedule", "epsilon", "model", "dataset"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    info = data_lib.get_info(spec["dataset"])
    if args.data_dir is None and spec["dataset"] == "mnist":
        args.data_dir = "/work/shared/data/mnist"
    x_train, y_train = data_lib.load_arrays(
        spec["dataset"], "train", args.data_dir, validation_size=0,
        num_examples=spec["num_train_examples"])
    x_test, y_test = data_lib.load_arrays(spec["dataset"], "test",
                                          args.data_dir,
                                          num_examples=args.test_examples)
    x_test = x_test.astype(np.float32) / 255.0
    train_ds, steps = train_lib.train_dataset(
        x_train, y_train, info, spec["batch_size"], spec["seed"], 0,
        spec["epochs"], augment=False)

    keras.utils.set_random_seed(spec["seed"])
    base = models.get(spec["model"], info.num_classes, info.input_shape,
                      mean=info.mean, std=info.std)
    model = RobustModel(base, method=spec["method"], epsilon=spec["epsilon"],
                        step_size=spec["step_size"], seed=spec["seed"])
    lr = spec["lr"]
    if spec["lr_schedule"] == "cyclic":   # 0 -> lr at 40% -> 0 (Wong et al.)
        lr = train_lib.CyclicSchedule(lr, spec["epochs"] * steps)
    model.compile(optimizer=keras.optimizers.Adam(lr))
    model.build((None,) + tuple(info.input_shape))

    # The guard's fixed batch: 256 training examples, a fixed random subset.
    pick = np.random.default_rng(123).choice(len(y_train), args.guard_examples,
                                             replace=False)
    run_dir = pathlib.Path(args.out) / args.name
    shutil.rmtree(run_dir, ignore_errors=True)   # no resume of an old state
    guard_kw = dict(every_steps=args.guard_every, pgd_steps=10,
                    model_dir=str(run_dir))
    if args.guard_every_override:
        guard_kw["every_steps"] = args.guard_every_override
    if spec["guard"] is None:   # monitor only: same measurements, no action
        guard = COGuard(x_train[pick], y_train[pick], policy="none",
                        rule=lambda window, m: False, **guard_kw)
    else:
        guard = COGuard(x_train[pick], y_train[pick], policy=spec["guard"],
                        rule="floor_and_gap", floor=0.05, gap=0.5,
                        factor=0.5, fallback="backward_smoothing",
                        max_collapses=3, **guard_kw)

    epochs = []

    class EpochEval(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            train_seconds = time.perf_counter() - self.t0
            report = evaluation.evaluate(
                model.base_model, x_test, y_test, [spec["epsilon"]],
                attacks=("fgsm", "pgd"), pgd_steps=20, seed=0)
            row = {
                "epoch": epoch + 1,
                "clean": float(report["clean_accuracy"]),
                "pgd20": float(report["robust_accuracy"]),
                "fgsm": float(report["attacks"][str(float(spec["epsilon"]))]
                              ["fgsm"]),
                "train_seconds": train_seconds,
                "method": model.method_name,
                "step_size": model.params.step_size,
                "collapses": guard.collapses,
                "iterations": int(model.optimizer.iterations.numpy()),
            }
            epochs.append(row)
            print(json.dumps(row), flush=True)

    start = time.perf_counter()
    model.fit(train_ds, epochs=spec["epochs"], steps_per_epoch=steps,
              callbacks=[guard, EpochEval()], verbose=0)
    wall = time.perf_counter() - start
    out = {
        "name": args.name, "spec": {k: v for k, v in spec.items()},
        "steps_per_epoch": steps, "epochs": epochs,
        "guard": {"examples": args.guard_examples, "every": args.guard_every,
                  "pgd_steps": 10, "extra_grad_evals": guard.extra_grad_evals,
                  "measure_seconds": guard.measure_seconds,
                  "events": guard.events,
                  "history": guard.history},
        "wall_seconds": wall,
        "final_method": model.method_name,
        "final_step_size": model.params.step_size,
    }
    path = pathlib.Path(args.out) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path} ({wall:.0f} s)")


LABELS = {"fgsm_rs": "fgsm_rs (step 0.375)",
          "fgsm_rs_guard": "fgsm_rs + guard (switch to BS)",
          "fgsm_rs_guard_shrink": "fgsm_rs + guard (shrink step)",
          "backward_smoothing": "backward_smoothing"}


def plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for name in args.names.split(","):
        path = pathlib.Path(args.out) / f"{name}.json"
        if path.exists():
            runs[name] = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        ep = [e["epoch"] for e in r["epochs"]]
        label = LABELS.get(name, name)
        axes[0].plot(ep, [100 * e["pgd20"] for e in r["epochs"]], "o-",
                     label=label)
        spe = r["steps_per_epoch"]
        hist = r["guard"]["history"]
        axes[1].plot([h["step"] / spe for h in hist],
                     [100 * h["pgd_accuracy"] for h in hist], "-",
                     label=f"{label}: PGD-10")
        axes[1].plot([h["step"] / spe for h in hist],
                     [100 * h["fgsm_accuracy"] for h in hist], ":",
                     color=axes[1].lines[-1].get_color(),
                     label=f"{label}: FGSM")
        for e in r["guard"]["events"]:
            if e.get("event") == "collapse":
                axes[1].axvline(e["step"] / spe, color="red", alpha=0.3)
    axes[0].set(xlabel="epoch", ylabel="PGD-20 test accuracy (%)",
                title="Robust test accuracy per epoch (MNIST, eps 0.3)",
                ylim=(0, 100))
    axes[1].set(xlabel="epoch (fractional)",
                ylabel="accuracy on the guard batch (%)",
                title="Guard measurements (red: rollback)", ylim=(0, 100))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")
    # Markdown table
    names = list(runs)
    n_ep = max(len(r["epochs"]) for r in runs.values())
    print("| epoch | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for i in range(n_ep):
        cells = []
        for name in names:
            eps = runs[name]["epochs"]
            cells.append(f"{100 * eps[i]['pgd20']:.1f} / {100 * eps[i]['clean']:.1f}"
                         if i < len(eps) else "-")
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    for name, r in runs.items():
        print(f"{name}: wall {r['wall_seconds']:.0f} s, collapses "
              f"{sum(e.get('event') == 'collapse' for e in r['guard']['events'])}, "
              f"final method {r['final_method']} step {r['final_step_size']}, "
              f"guard grad evals {r['guard']['extra_grad_evals']}, "
              f"guard seconds {r['guard']['measure_seconds']:.1f}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", choices=sorted(RUNS), required=True)
    r.add_argument("--data_dir", default=None,
                   help="default: /work/shared/data/mnist for mnist, the "
                        "offline default location for fashion_mnist")
    r.add_argument("--out", default=str(REPO / "runs" / "co_reproduction"))
    r.add_argument("--epochs", type=int)
    r.add_argument("--num_train_examples", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--lr_schedule", choices=["constant", "cyclic"])
    r.add_argument("--step_size", type=float)
    r.add_argument("--epsilon", type=float)
    r.add_argument("--model")
    r.add_argument("--dataset", choices=["mnist", "fashion_mnist"])
    r.add_argument("--seed", type=int)
    r.add_argument("--test_examples", type=int, default=1000)
    r.add_argument("--guard_examples", type=int, default=256)
    r.add_argument("--guard_every", type=int, default=100)
    r.add_argument("--guard_every_override", type=int)
    q = sub.add_parser("plot")
    q.add_argument("--out", default=str(REPO / "runs" / "co_reproduction"))
    q.add_argument("--names", default="fgsm_rs,fgsm_rs_guard,"
                   "fgsm_rs_guard_shrink,backward_smoothing")
    q.add_argument("--png", default=str(REPO / "docs" / "co_guard_curves.png"))
    args = p.parse_args()
    run(args) if args.cmd == "run" else plot(args)


if __name__ == "__main__":
    main()
