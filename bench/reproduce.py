#!/usr/bin/env python3
"""Runs the reproduction grid and writes its report: tables and plots (--output, default runs/grid_report.md).

    python bench/reproduce.py [--seeds=0,1,2] [--datasets=mnist,fashion_mnist]
                              [--methods=...] [--runs=runs/grid] [--report_only]

For every (dataset, method, seed): ``bin/train --flagfile=experiments/grid/
<dataset>_<method>.flags --seed=S --model_dir=<runs>/<dataset>_<method>_sS``,
then ``bin/evaluate`` on the test set: PGD-20 on all 10 000 test images, and
PGD-100 with 2 restarts plus ``autoattack_lite`` (APGD-CE, then APGD-T on the
rest) on the first ``--strong_examples`` test images. Finished runs and
evaluations are skipped, so the grid resumes where it stopped. The tables
(mean and spread over seeds) and plots are rebuilt from the run directories
only, so ``--report_only`` regenerates them without training.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ["natural", "fgsm_rs", "fast_trades", "gradalign", "n_fgsm", "pgd_at",
           "trades", "backward_smoothing"]
EPS = {"mnist": 0.3, "fashion_mnist": 0.1}


def sh(cmd, log):
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def data_dir_args(flagfile):
    return [line for line in flagfile.read_text().splitlines() if line.startswith("--data_dir=")]


# Wong et al.'s MNIST evaluation: PGD-50, step 0.01, 10 restarts, first 1000 test images.
WONG_EVAL = ["--attacks=pgd", "--pgd_steps=50", "--step_size=0.01", "--restarts=10",
             "--num_examples=1000"]


def run_one(ds, method, seed, runs, strong, extra_flags=(), name=None, flagfile=None,
            evals=("pgd20", "strong"), autoattack=0):
    """Trains and evaluates one grid cell; ``extra_flags`` follow the flagfile
    (later flags win) and ``name`` replaces ``<ds>_<method>`` in the run dir.
    ``flagfile`` replaces the grid's ``experiments/grid/<ds>_<method>.flags``.
    ``evals``: ``pgd20`` (all test images; without it the training run's own
    final PGD-20 on all test images is read), ``strong`` (PGD-100x2 and
    autoattack_lite on the first ``strong``) and ``wong`` (Wong et al.'s
    PGD-50 x 10, step 0.01, first 1000 test images), ``aa20`` (PGD-20 and
    autoattack_lite on the first 1000 test images; not run when the training run's
    own final check measured them); ``autoattack`` > 0 adds
    the full AutoAttack (standard version) on the first ``autoattack`` test
    images."""
    flagfile = REPO / (flagfile or f"experiments/grid/{ds}_{method}.flags")
    name = name or f"{ds}_{method}"
    run_dir = runs / f"{name}_s{seed}"
    log = runs / f"{name}_s{seed}.log"
    if not (run_dir / "results.json").exists():
        sh([sys.executable, "bin/train", f"--flagfile={flagfile.relative_to(REPO)}",
            *extra_flags, f"--seed={seed}", f"--model_dir={run_dir}", "--verbose=2"], log)
    common = [sys.executable, "bin/evaluate", f"--model_path={run_dir}", f"--dataset={ds}",
              f"--epsilon={EPS[ds]}", "--progress=false", *data_dir_args(flagfile)]
    if "wong" in evals and not (run_dir / "eval_wong.json").exists():
        sh(common + WONG_EVAL + [f"--output={run_dir / 'eval_wong.json'}"], log)
    if "pgd20" in evals and not (run_dir / "eval_pgd20.json").exists():
        sh(common + ["--attacks=pgd", "--pgd_steps=20", f"--output={run_dir / 'eval_pgd20.json'}"], log)
    if ("aa20" in evals and not (run_dir / "eval_aa20.json").exists()
            and _final_aa20(_json(run_dir / "results.json")) is None):
        sh(common + ["--attacks=pgd,autoattack_lite", "--pgd_steps=20", "--num_examples=1000",
                     f"--output={run_dir / 'eval_aa20.json'}"], log)
    if "strong" in evals and not (run_dir / "eval_strong.json").exists():
        sh(common + ["--attacks=pgd,autoattack_lite", "--pgd_steps=100", "--restarts=2",
                     f"--num_examples={strong}", f"--output={run_dir / 'eval_strong.json'}"], log)
    if autoattack and not (run_dir / "eval_autoattack.json").exists():
        sh(common + ["--attacks=autoattack", f"--num_examples={autoattack}",
                     f"--output={run_dir / 'eval_autoattack.json'}"], log)


def collect(runs, datasets, methods, seeds):
    rows = {}
    for ds in datasets:
        for m in methods:
            for seed in seeds:
                row = read_run(runs / f"{ds}_{m}_s{seed}", ds)
                if row is not None:
                    rows.setdefault((ds, m), []).append(row)
    return rows


def _json(path):
    return json.loads(path.read_text()) if path.exists() else None


def _final_aa20(results):
    """``{"pgd", "autoattack_lite"}`` from a run's own final check (``bin/train
    --test_autoattack_examples=1000 --test_pgd_steps=20``, the run's seed) when it
    measured what ``aa20`` measures, else None; then ``aa20`` is not run again."""
    block = (results or {}).get("autoattack_lite")
    if not block or block["test_examples"] != 1000 or not results["robust_attack"].startswith(
            "PGD-20 "):
        return None
    return {"pgd": block["pgd_accuracy"], "autoattack_lite": block["autoattack_lite_accuracy"]}


def read_run(d, ds, evals=("pgd20", "strong")):
    """One finished, evaluated run directory as a table row (None if unfinished or if
    one of ``evals`` is missing; ``eval_aa20.json`` is read where it exists)."""
    wanted = {"pgd20": "eval_pgd20.json", "strong": "eval_strong.json", "wong": "eval_wong.json",
              "aa20": "eval_aa20.json"}
    if not (d / "results.json").exists() or not all((d / wanted[e]).exists() for e in evals):
        return None
    res = _json(d / "results.json")
    pgd20 = _json(d / "eval_pgd20.json") or res  # the run's own PGD-20 on all test images
    strong = _json(d / "eval_strong.json")
    acc = {}
    if strong is not None:
        acc = strong["attacks"][str(EPS[ds])] if str(EPS[ds]) in strong["attacks"] else \
            next(iter(strong["attacks"].values()))
    wong = _json(d / "eval_wong.json")
    aa = _json(d / "eval_autoattack.json")
    aa20 = _json(d / "eval_aa20.json")
    aa20 = next(iter(aa20["attacks"].values())) if aa20 else (_final_aa20(res) or {})
    curve = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    return {
        "clean": pgd20["clean_accuracy"], "pgd20": pgd20["robust_accuracy"],
        "pgd100": acc.get("pgd"), "aa_lite": acc.get("autoattack_lite"),
        "train_s": res["train_seconds"],
        # forward+backward passes per training example over the run
        "grad_evals_per_example": res["grad_evals_per_example_per_step"] * res["epochs"],
        "val_curve": [c.get("val_robust_accuracy") for c in curve],
        "train_attack_curve": [c.get("adv_accuracy") for c in curve],
        "strong_n": strong["num_examples"] if strong else None,
        "wong": wong["robust_accuracy"] if wong else None,
        "wong_clean": wong["clean_accuracy"] if wong else None,
        "aa": aa["robust_accuracy"] if aa else None,
        "aa_n": aa["num_examples"] if aa else None,
        # PGD-20 and autoattack_lite on the same first 1000 test images (``aa20``)
        "pgd20_1000": aa20.get("pgd"), "aa_lite_1000": aa20.get("autoattack_lite")}


def fmt(values, pct=True):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    if pct:
        return f"{100 * mean:.1f} ± {100 * spread:.1f}"
    return f"{mean:.0f} ± {spread:.0f}"


def report(rows, runs, out_md, datasets, methods, command):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Reproduction results", "",
             f"Produced by `{command}` (tables and plots regenerated from `{runs}` by the same script).",
             "Model: Wong et al.'s small MNIST CNN (`mnist_cnn`), 5 epochs, Adam 1e-3 with piecewise "
             "decay, batch 128, the same schedule for every method; best epoch by validation PGD-10 "
             "accuracy (1000 held-out training images). Mean ± standard deviation over seeds "
             "(n = number of seeds). PGD-20: all 10 000 test images. PGD-100 (2 restarts) and "
             "autoattack_lite (APGD-CE then APGD-T, 9 targets, each run with the same 2 restarts; "
             "an upper bound on full AutoAttack with those restarts): "
             "the first N test images (column N). AutoAttack: the standard version (APGD-CE, "
             "APGD-T, FAB-T, Square; `--attacks=autoattack`) on the first N_AA test images, "
             "where measured (`--autoattack_examples`). Train time: wall-clock seconds of training on "
             "this 2-core CPU (graph mode). Gradient evaluations: forward+backward passes per "
             "training example over the run.", ""]
    for ds in datasets:
        lines += [f"## {ds} (eps {EPS[ds]})", "",
                  "| method | flagfile | n | clean % | PGD-20 % | PGD-100x2 % | AA-lite % | N | "
                  "AutoAttack % | N_AA | train s | grad evals / example |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            r = rows.get((ds, m))
            if not r:
                continue
            lines.append(
                f"| {m} | `experiments/grid/{ds}_{m}.flags` | {len(r)} | {fmt([x['clean'] for x in r])} | "
                f"{fmt([x['pgd20'] for x in r])} | {fmt([x['pgd100'] for x in r])} | "
                f"{fmt([x['aa_lite'] for x in r])} | {r[0]['strong_n']} | "
                f"{fmt([x['aa'] for x in r])} | {r[0]['aa_n'] or '-'} | "
                f"{fmt([x['train_s'] for x in r], pct=False)} | "
                f"{fmt([x['grad_evals_per_example'] for x in r], pct=False)} |")
        lines.append("")
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    fig2, axes2 = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, ax2, ds in zip(axes[0], axes2[0], datasets):
        for m in methods:
            r = rows.get((ds, m))
            if not r:
                continue
            ax.scatter([x["train_s"] for x in r], [100 * (x["aa_lite"] or 0) for x in r], label=m)
            curves = [x["val_curve"] for x in r]
            n = min(len(c) for c in curves)
            mean = [statistics.mean([c[i] or 0 for c in curves]) * 100 for i in range(n)]
            ax2.plot(range(1, n + 1), mean, marker="o", label=m)
        ax.set(title=f"{ds} eps {EPS[ds]}", xlabel="training time (s)", ylabel="AA-lite robust accuracy (%)")
        ax2.set(title=f"{ds} eps {EPS[ds]}", xlabel="epoch", ylabel="validation PGD-10 accuracy (%)")
        ax.legend(fontsize=7)
        ax2.legend(fontsize=7)
    docs = out_md.parent
    fig.tight_layout()
    fig.savefig(docs / "results_time.png", dpi=110)
    fig2.tight_layout()
    fig2.savefig(docs / "results_epochs.png", dpi=110)
    lines += ["![robust accuracy vs training time](results_time.png)", "",
              "![validation robust accuracy per epoch](results_epochs.png)", ""]
    existing = out_md.read_text() if out_md.exists() else ""
    marker = "<!-- analysis -->"
    analysis = existing[existing.index(marker):] if marker in existing else marker + "\n"
    out_md.write_text("\n".join(lines) + "\n" + analysis)
    print(f"wrote {out_md}")


def add_run_args(p, seeds, output):
    """The flags shared by the grid runner and bench/mnist_study.py."""
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--runs", default="runs/grid")
    p.add_argument("--strong_examples", type=int, default=1000)
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--output", default=output)
    p.add_argument("--autoattack_examples", type=int, default=0,
                   help="also run the full AutoAttack on the first N test images (0: no)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p, "0,1,2", "runs/grid_report.md")
    p.add_argument("--datasets", default="mnist,fashion_mnist")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    runs = REPO / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    datasets, methods = args.datasets.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.time()
    if not args.report_only:
        for seed in seeds:
            for ds in datasets:
                for m in methods:
                    run_one(ds, m, seed, runs, args.strong_examples,
                            autoattack=args.autoattack_examples)
                    print(f"[{time.time() - start:.0f} s] done {ds} {m} seed {seed}", flush=True)
    command = "python bench/reproduce.py " + " ".join(sys.argv[1:])
    report(collect(runs, datasets, methods, seeds), args.runs, REPO / args.output, datasets, methods, command.strip())


if __name__ == "__main__":
    main()
