"""One evaluation from a frozen :class:`~tf_backsmooth.config.EvalConfig`: what
``bin/evaluate`` runs.

:func:`run` loads the model and the data, checks that they fit, evaluates
with :func:`tf_backsmooth.evaluation.evaluate` and returns the report;
:func:`plot_report` draws it. Every problem is an :class:`EvalError` with one
line naming the flag. No absl flags are read here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tf_backsmooth import data, evaluation, fileio


class EvalError(ValueError):
    """An evaluation run cannot proceed; the message names the flag."""


def _one_line(err):
    return " ".join(str(err).split())


def run(config) -> dict:
    """Loads the model and the data of ``config`` (a validated
    :class:`tf_backsmooth.config.EvalConfig`), evaluates and returns the
    report (with ``data`` and ``model_path`` added). Raises :class:`EvalError`
    with one line naming the flag for a bad attack list, an unloadable model
    or dataset, or a model that does not fit the data."""
    try:
        attacks = evaluation.parse_attacks(config.attacks)
    except ValueError as err:
        raise EvalError(f"--attacks={config.attacks}: {err}") from None
    try:
        model = evaluation.load_classifier(config.model_path)
    except (OSError, ValueError) as err:
        raise EvalError(f"--model_path={config.model_path}: {_one_line(err)}") from None
    try:
        x, y = data.load_arrays(config.dataset, config.split, data_dir=config.data_dir,
                                num_examples=config.num_examples)
    except (OSError, ValueError) as err:
        raise EvalError(f"--dataset={config.dataset} (--data_dir={config.data_dir}): "
                        f"{_one_line(err)}") from None
    expected = tuple(getattr(model, "input_shape", (None,) + x.shape[1:])[1:])
    if None not in expected and expected != tuple(x.shape[1:]):
        raise EvalError(f"--model_path={config.model_path}: the model takes inputs of shape "
                        f"{expected} but --dataset={config.dataset} has images of shape "
                        f"{tuple(x.shape[1:])}")
    outputs = getattr(model, "output_shape", None)
    classes = (outputs[-1] if isinstance(outputs, tuple) and isinstance(outputs[-1], int)
               else None)
    if classes is not None and int(y.max()) >= classes:
        raise EvalError(f"--model_path={config.model_path}: the model has {classes} outputs "
                        f"but --dataset={config.dataset} has labels up to {int(y.max())}")
    if ({"apgd_t", "autoattack_lite", "autoattack"} & set(attacks) and classes is not None
            and classes < 4):
        raise EvalError("--attacks: apgd_t needs a model with >= 4 classes")

    x = np.asarray(x, np.float32) / 255.0
    try:
        report = evaluation.evaluate(
            model, x, y, list(config.epsilon), attacks, batch_size=config.batch_size,
            pgd_steps=config.pgd_steps, restarts=config.restarts,
            step_size=config.step_size, apgd_steps=config.apgd_steps,
            apgd_targets=config.apgd_targets, square_queries=config.square_queries,
            fab_steps=config.fab_steps, seed=config.seed, progress=config.progress,
            jit_compile=config.jit_compile)
    except ValueError as err:  # e.g. a model that rejects the data
        raise EvalError(_one_line(err)) from None
    report["data"] = {"dataset": config.dataset, "split": config.split,
                      "data_dir": config.data_dir}
    report["model_path"] = str(config.model_path)
    return report


def plot_report(report, path):
    """A PNG plot of accuracy vs epsilon (one line per attack and the worst
    case), written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted(report["epsilons"])
    xs = [0.0] + epsilons
    clean = report["clean_accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = []
    for eps in epsilons:
        for name in report["attacks"][str(eps)]:
            if name not in names:
                names.append(name)
    for name in names:
        ys = [clean] + [report["attacks"][str(e)].get(name, float("nan")) for e in epsilons]
        ax.plot(xs, [100 * v for v in ys], marker="o", label=name)
    robust = report["robust_accuracy"]
    worst = [robust] if not isinstance(robust, dict) else [robust[str(e)] for e in epsilons]
    ax.plot(xs, [100 * clean] + [100 * v for v in worst], marker="s", color="black",
            linewidth=2.5, label="worst case")
    ax.set_xlabel("epsilon (L-inf, pixel units)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['data']['dataset']} {report['data']['split']}: "
                 f"{report['num_examples']} examples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format=Path(path).suffix[1:] or "png")
    plt.close(fig)
    fileio.write_bytes(path, buf.getvalue())
