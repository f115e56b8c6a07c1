#!/usr/bin/env python3
"""Robust accuracy against the compute spent to reach it, for several runs, from their own logs.

    python bench/robustness_vs_compute.py --runs=runs/bs,runs/trades10 [--labels=BS,TRADES-10]
                                          [--output=robustness_vs_compute.png] [--table=FILE]

Each run is a ``bin/train`` run directory trained with ``--curve_every=K``: its
``metrics.jsonl`` holds, every K epochs, autoattack_lite (and PGD-20, clean)
accuracy on the first ``--curve_examples`` test images beside the cumulative
training seconds (``epoch_seconds`` summed; the curve's own evaluation is not
counted) and gradient evaluations (``grad_evals``: forward + backward passes
summed over training examples). Failed attempts that a run restarted
(``attempts.json``) count too: their seconds and gradient evaluations are
added before the kept attempt's first point, so a recipe that needs restarts
pays for them on the curve.

Writes one PNG with two panels (against training seconds, against gradient
evaluations) and prints (or writes, ``--table``) a Markdown table of every
point. Reads only the run directories: no TensorFlow, nothing is trained or
evaluated here.
"""

import argparse
import json
import pathlib
import sys


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(run_dir):
    """The run's curve points and a description: ``(points, about)``, each
    point ``{epoch, seconds, grad_evals, aa, pgd, clean}`` with cumulative
    seconds and gradient evaluations."""
    run_dir = pathlib.Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (not a bin/train run directory?)")
    config = {}
    if (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
    attempts = []
    if (run_dir / "attempts.json").is_file():
        attempts = json.loads((run_dir / "attempts.json").read_text())
    seconds = sum(a.get("train_seconds", 0.0) for a in attempts)
    evals_before = sum(a.get("grad_evals", 0.0) for a in attempts)
    points = []
    for record in sorted(read_jsonl(metrics), key=lambda r: r["epoch"]):
        seconds += record.get("epoch_seconds", 0.0)
        if "curve_autoattack_lite_accuracy" in record:
            points.append({"epoch": record["epoch"], "seconds": seconds,
                           "grad_evals": evals_before + record.get("grad_evals", 0.0),
                           "aa": record["curve_autoattack_lite_accuracy"],
                           "pgd": record.get("curve_pgd_accuracy"),
                           "clean": record.get("curve_clean_accuracy")})
    if not points:
        raise SystemExit(f"{run_dir}: metrics.jsonl has no curve points (train with "
                         "--curve_every=K)")
    about = {"method": config.get("method"), "model": config.get("model"),
             "epsilon": config.get("epsilon"), "seed": config.get("seed"),
             "failed_attempts": len(attempts)}
    return points, about


def table(curves):
    lines = ["| run | method | epoch | train s | gradient evaluations | autoattack_lite % | "
             "PGD-20 % | clean % |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, (points, about) in curves.items():
        for p in points:
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            lines.append(f"| {label} | {about['method']} | {p['epoch']} | {p['seconds']:.0f} | "
                         f"{p['grad_evals']:.3g} | {pct(p['aa'])} | {pct(p['pgd'])} | "
                         f"{pct(p['clean'])} |")
    return "\n".join(lines) + "\n"


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (points, _) in curves.items():
        aa = [100 * p["aa"] for p in points]
        axes[0].plot([p["seconds"] for p in points], aa, marker="o", label=label)
        axes[1].plot([p["grad_evals"] for p in points], aa, marker="o", label=label)
    axes[0].set_xlabel("training time (s)")
    axes[1].set_xlabel("gradient evaluations (passes x examples)")
    for ax in axes:
        ax.set_ylabel("autoattack_lite accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="comma-separated run directories")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: folder names)")
    p.add_argument("--output", default="robustness_vs_compute.png", help="the PNG to write")
    p.add_argument("--table", default=None, help="write the Markdown table here (default: print)")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    labels = args.labels.split(",") if args.labels else [pathlib.Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(runs)} runs")
    curves = {label: curve(run) for label, run in zip(labels, runs)}
    plot(curves, args.output)
    text = table(curves)
    if args.table:
        pathlib.Path(args.table).write_text(text)
    else:
        sys.stdout.write(text)
    print(f"plot written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
