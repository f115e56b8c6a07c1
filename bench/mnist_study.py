#!/usr/bin/env python3
"""MNIST eps 0.3 recipes, per seed: what makes robust training reliable there.

    python bench/mnist_study.py [--variants=...] [--seeds=...] [--report_only]

Each variant is a recipe flagfile (``experiments/mnist_*.flags``) plus at most
a few flags that change one thing, trained for several seeds with ``bin/train``
and evaluated with ``bin/evaluate``; the report (``--output``) gets one row per
run, so failures are counted, not averaged away. Variants of the ``recipes``
group are evaluated as the reproduction grid does (PGD-20 on the 10 000 test
images, from the run's own final evaluation; PGD-100x2 and autoattack_lite on
the first ``--strong_examples``); the ``wong`` group with Wong et al.'s attack
(PGD-50, step 0.01, 10 restarts, first 1000 test images) and, since 2026-12-04,
PGD-20 and autoattack_lite on the same 1000 (``eval_aa20.json``, or the run's own
final check where its flagfile sets ``--test_autoattack_examples=1000``; shown where
measured). Finished runs and
evaluations are skipped, so it resumes after a stop.

The tables are rebuilt (``--report_only``: without training) from the run
directories where they exist and otherwise from ``bench/results_mnist_study.json``,
the committed store of every run's numbers: ``runs/`` is not in the repository,
so a run whose directory is gone keeps its row. Each report rewrites the store
records of the runs it read from a directory. Variants with neither a run
directory nor a stored record are left out.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import reproduce  # noqa: E402

REPO = reproduce.REPO
BS = "experiments/mnist_backward_smoothing.flags"
TRADES = "experiments/mnist_trades.flags"
PGD = "experiments/mnist_pgd_at.flags"
WONG = "experiments/mnist_fgsm_rs_wong.flags"
# Since 7236f69 the Wong flagfile restarts a failed run (--failure_restarts=2
# --failure_data=train --failure_from_epoch=10); every variant measured before pins it off.
NO_RESTART = ["--failure_restarts=0", "--failure_overestimate_gap=1"]
# The Wong flagfile before cb6112b: its restart check without autoattack_lite.
NO_MASKING = ["--failure_overestimate_gap=1"]
SIX, THREE = "0,1,2,3,4,5", "0,1,2"
VAL = ["--validation_size=1000", "--eval_every=1"]  # another data order, best-epoch selection
# The BS flagfile's settings before 2cd1669 (piecewise lr at 50 %/75 %, the end of the
# warm-up not judged): pinned by every BS variant measured before it.
PRE10 = ["--lr_boundaries=", "--failure_warmup_gap=1"]
OURS = ["--clip_start=true", "--normalize=true", "--init=keras"]  # our defaults before bc8e185


def _one_of_ours(prefix, flags, seeds, abouts):
    """Wong's recipe with ``flags`` and ONE of OURS, a variant each: ``<prefix>_clip_start``,
    ``<prefix>_normalize``, ``<prefix>_keras_init``, with their seeds and descriptions."""
    names = ("clip_start", "normalize", "keras_init")
    return {f"{prefix}_{name}": ("wong", WONG, NO_RESTART + flags + [flag], seed_list, about)
            for name, flag, seed_list, about in zip(names, OURS, seeds, abouts)}


# name -> (group, flagfile, extra flags, default seeds, what it tests)
VARIANTS = {
    "trades": ("recipes", TRADES, [], SIX, "TRADES-10, the recipe flagfile"),
    "backward_smoothing": ("recipes", BS, [], SIX,
                           "Backward Smoothing, the recipe flagfile (since 2cd1669: 4 epochs, "
                           "warm-up over 2, lr 1e-3 until 2.5 then 1e-4; the end of the warm-up "
                           "judged with a gap of 0.25)"),
    "bs_rollback": ("recipes", BS, ["--failure_rollback"], "2,3,4",
                    "the recipe, but a failed attempt continues from the checkpoint at the start "
                    "of its failed epoch with the new seed instead of restarting from scratch "
                    "(seeds 0, 1 and 5 never fail: their runs are the recipe's)"),
    "bs_5ep_w2": ("recipes", BS, PRE10 + ["--epochs=5"], SIX,
                  "the BS recipe of 721d7bc: 5 epochs, warm-up over 2 (3 at full eps), "
                  "piecewise lr /10 at 2.5 and 3.75"),
    "bs_6ep": ("recipes", BS, PRE10 + ["--epochs=6", "--epsilon_warmup_epochs=2.5"], SIX,
               "the BS recipe of c2d8b62: 6 epochs, warm-up over 2.5 (3.5 at full eps)"),
    "bs_4ep": ("recipes", BS, ["--failure_warmup_gap=1"], SIX,
               "the 2cd1669 recipe without judging the end of the warm-up (a failed attempt "
               "restarts after epoch 3, not 2): 4 epochs, warm-up over 2, lr 1e-3 until 2.5 then "
               "1e-4"),
    "bs_5ep": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=2.5"], SIX,
               "the BS recipe before c2d8b62: 5 epochs (warm-up 2.5 epochs, so 2.5 at full eps)"),
    "bs_warmup_only": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=2.5", "--failure_restarts=0"], SIX,
                       "BS recipe without the automatic restart (warm-up only)"),
    "bs_warmup_1": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=1"], THREE,
                    "BS with a warm-up over 1 epoch instead of 2.5 (the first recipe tried)"),
    "bs_no_warmup": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=0"], SIX,
                     "BS recipe without the epsilon warm-up (= the grid's old MNIST recipe)"),
    "bs_cosine": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=2.5", "--lr_schedule=cosine"], SIX,
                  "BS recipe with a cosine learning rate (still 5e-4 when the warm-up ends) "
                  "instead of piecewise (already 1e-4 there)"),
    "bs_cyclic": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=2.5", "--lr_schedule=cyclic"], SIX,
                  "BS recipe with Wong et al.'s cyclic learning rate (0 -> 1e-3 at 40 % -> 0)"),
    "bs_step125": ("recipes", BS, PRE10 + ["--epochs=5", "--epsilon_warmup_epochs=2.5", "--step_size=0.375"], "0,1",
                   "BS recipe with step size 1.25 eps = 0.375 (Wong et al.'s FGSM ratio) instead of "
                   "alpha = eps; stopped after 2 seeds (no gain)"),
    "pgd_at": ("recipes", PGD, [], "0,1", "PGD-AT with 40 steps of 0.01, the recipe flagfile"),
    **{f"{m}_bs_recipe": ("recipes", BS, [f"--method={m}"], THREE,
                          f"{what} with the Backward Smoothing flagfile unchanged otherwise "
                          "(2664db0): the same warm-up, learning rate, failure check and "
                          "restarts, the method's default step")
       for m, what in (("fgsm_rs", "FGSM-RS (uniform start, one step of 1.25 eps)"),
                       ("fast_trades", "Fast TRADES (uniform start, one KL step of eps)"),
                       ("gradalign", "GradAlign (FGSM step of eps + 0.2 x (1 - cos))"),
                       ("n_fgsm", "N-FGSM (noise 2 eps, one step of eps, no projection)"))},
    "wong": ("wong", WONG, NO_RESTART, SIX,
             "Wong et al.'s FGSM-RS recipe, flag for flag (the flagfile without its restart)"),
    "wong_co_guard": ("wong", WONG, NO_RESTART + ["--co_guard"], SIX,
                      "... with the catastrophic-overfitting guard at its defaults (PGD-10 vs FGSM "
                      "on 128 training images every 200 steps; on a collapse, roll back and halve "
                      "the FGSM step: still FGSM-RS, docs/CO_GUARD.md)"),
    "wong_five_restarts": ("wong", WONG, ["--failure_restarts=5"], SIX,
                           "wong_masking_check (the flagfile) with up to 5 restarts instead of 2 "
                           "(550914b): does a larger restart budget rescue the runs whose 3 "
                           "attempts all failed? Not adopted: 1 of 4 such runs, at 1.6-2.0x their "
                           "training time"),
    "wong_masking_check": ("wong", WONG, [], SIX,
                           "the flagfile since cb6112b: wong_restart's check also runs "
                           "autoattack_lite on its 1000 training images and restarts a run "
                           "whose PGD-20 accuracy there is more than 10 points above it "
                           "(--failure_overestimate_gap=0.1: gradient masking), and compares "
                           "attempts by the worst case of both"),
    "wong_restart": ("wong", WONG, NO_MASKING, SIX,
                     "the flagfile from 55c1ed2 to cb6112b: their recipe with an automatic restart (new seed, from scratch, up to 2 times) when "
                     "the finished run is more than 20 points more accurate on its own FGSM "
                     "training attack than under PGD-20 on 1000 training images (no validation "
                     "split, so the data order is the recipe's)"),
    "wong_restart_pgd10": ("wong", WONG, NO_MASKING + ["--failure_pgd_steps=0"], SIX,
                           "the flagfile of 7236f69: the same restart, but the check "
                           "measured PGD-10 (--eval_pgd_steps) on the training images; "
                           "seed 11 (55c1ed2) showed it misses a partial collapse that "
                           "PGD-20 sees"),
    "wong_s4code": ("wong", WONG, NO_RESTART, THREE,
                    "the same flagfile and seeds, trained on 2026-12-02 on another VM with that "
                    "day's code (before fastgrad, 60c32cb: the attack's input gradient "
                    "through the first convolution came from TensorFlow's kernel, equal up to "
                    "float rounding); report only: the current code retrains these seeds as "
                    "`wong`"),
    "wong_initbug": ("wong", WONG, NO_RESTART, THREE,
                     "the same, measured at bc8e185 with the `--init=torch` bug (each bias a "
                     "copy of the first entries of its layer's kernel; fixed in 683aba4); "
                     "report only: these runs cannot be repeated"),
    "wong_val": ("wong", WONG, NO_RESTART + VAL, THREE,
                 "... but 1000 training images held out for validation (another data order; "
                 "the exported model is the best epoch by validation PGD-10)"),
    "wong_ours_val": ("wong", WONG, NO_RESTART + VAL + OURS, THREE,
                      "... with the validation split and our three previous defaults: the command "
                      "that first collapsed for seed 0"),
    **_one_of_ours("wong_val", VAL, ("0,1", "0", "0"), (
        "wong_val with one of our defaults: the start clipped before the gradient pass",
        "wong_val with one of our defaults: normalisation by the MNIST mean and std",
        "wong_val with one of our defaults: Keras' initialisation")),
    **_one_of_ours("wong", [], (THREE,) * 3, (
        "... but the random start is clipped to [0, 1] before the gradient pass",
        "... but the network normalises by the MNIST mean and std",
        "... but Keras' initialisation (Glorot uniform, zero bias)")),
    "wong_ours": ("wong", WONG, NO_RESTART + OURS, THREE,
                  "... with all three of our previous defaults (clipped start, normalisation, "
                  "Keras init)"),
}
EVALS = {"recipes": ("strong",), "wong": ("wong",)}
# Run by training runs since 2664db0 and read where present, but not required of a
# run directory: PGD-20 and autoattack_lite on the same first 1000 test images.
EXTRA_EVALS = {"wong": ("aa20",)}
REPORT_ONLY = {"wong_initbug", "wong_s4code"}  # rows kept from code that no longer exists
STORE = "bench/results_mnist_study.json"  # per-run numbers, committed (runs/ is not)
STORE_ABOUT = (
    "Per-run numbers of the MNIST study report, one record per run directory name "
    "(mnist_<variant>_s<seed>), written by bench/mnist_study.py. Accuracies are fractions in "
    "[0, 1] as bench/reproduce.py's read_run returns them, null where not measured; `command` "
    "trains the run (`python bench/mnist_study.py --variants=<variant> --seeds=<seed>` trains "
    "and evaluates it); `source` tells where the numbers were read: a run directory (full "
    "precision, whole curves) or the tables of the earlier report (rounded to 0.1 points and "
    "1 s; val_curve then holds epoch 1 only and train_attack_curve the last epoch only).")
FAIL = 0.5  # recipes: a run whose autoattack_lite accuracy is below this is counted as failed
WONG_FAIL = 0.75  # wong: a seed below this fails the 75 % floor


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def _seeds(variant, override):
    return [int(s) for s in (override or VARIANTS[variant][3]).split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reproduce.add_run_args(p, None, "runs/mnist_study.md")
    p.set_defaults(runs="runs/study")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--store", default=STORE,
                   help="JSON store of per-run numbers, the fallback for missing run directories")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    runs = REPO / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not args.report_only:
        for v in variants:  # variant-major: each variant's seeds finish together
            if v in REPORT_ONLY:
                continue
            group, flagfile, extra, _, _ = VARIANTS[v]
            for seed in _seeds(v, args.seeds):
                reproduce.run_one("mnist", None, seed, runs, args.strong_examples,
                                  extra_flags=extra, name=f"mnist_{v}", flagfile=flagfile,
                                  evals=EVALS[group] + EXTRA_EVALS.get(group, ()),
                                  autoattack=args.autoattack_examples if group == "recipes" else 0)
                print(f"[{time.time() - start:.0f} s] done {v} seed {seed}", flush=True)
    write_report(args, runs)


def train_command(v, seed, runs_rel="runs/study"):
    """The ``bin/train`` command of one run, as ``reproduce.run_one`` issues it."""
    _, flagfile, extra, _, _ = VARIANTS[v]
    return " ".join(["bin/train", f"--flagfile={flagfile}", *extra, f"--seed={seed}",
                     f"--model_dir={runs_rel}/mnist_{v}_s{seed}"])


def store_record(v, seed, row, source, runs_rel="runs/study"):
    """One store record: ``row`` (``reproduce.read_run``'s dict) plus where it came from."""
    return {"variant": v, "seed": seed, "group": VARIANTS[v][0],
            "command": train_command(v, seed, runs_rel), "source": source, **row}


def load_store(path):
    if not path.exists():
        return {"about": STORE_ABOUT, "runs": {}}
    return json.loads(path.read_text())


def save_store(store, path):
    """Writes the store (records in VARIANTS order, then by seed) atomically."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    runs = sorted(store["runs"].items(),
                  key=lambda kv: (order.get(kv[1]["variant"], len(order)), kv[1]["variant"],
                                  kv[1]["seed"]))
    text = json.dumps({"about": STORE_ABOUT, "runs": dict(runs)}, indent=1) + "\n"
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"wrote {path}")


def collect(v, args, runs, store, from_dirs):
    """[(seed, row)] of one variant: from the run directory when it holds a finished,
    evaluated run (its store record is then replaced, its name added to ``from_dirs``),
    else from the store."""
    group = VARIANTS[v][0]
    stored = {r["seed"]: r for r in store["runs"].values() if r["variant"] == v}
    seeds = sorted(set(_seeds(v, None)) | set(_seeds(v, args.seeds)) | set(stored))
    out = []
    for s in seeds:
        name = f"mnist_{v}_s{s}"
        row = reproduce.read_run(runs / name, "mnist", EVALS[group])
        if row is not None:
            store["runs"][name] = store_record(v, s, row, f"run directory {args.runs}/{name}",
                                               args.runs)
            from_dirs.add(name)
            out.append((s, store["runs"][name]))
        elif s in stored:
            out.append((s, stored[s]))
    return out


def write_report(args, runs):
    study_command = "python bench/mnist_study.py " + " ".join(sys.argv[1:])
    store_path = REPO / args.store
    store = load_store(store_path)
    from_dirs, body, reported = set(), [], []
    for group, title, header, row_fn, summary_fn in (
            ("recipes", "Recipes (`experiments/mnist_*.flags`)",
             "| variant | seed | clean % | PGD-20 % (10 000) | PGD-100x2 % | AA-lite % | N | "
             "AutoAttack % (N) | val PGD-10 e1 % | train-attack acc % | train s |",
             _recipe_row, _recipe_summary),
            ("wong", "Wong et al.'s FGSM-RS recipe and one-change ablations "
             "(`experiments/mnist_fgsm_rs_wong.flags`)",
             "| variant | seed | clean % (1000) | PGD-50x10 % (1000) | AA-lite % (1000) | "
             "PGD-20 % (same 1000) | PGD-20 % (10 000) | train-attack acc % | train s |",
             _wong_row, _wong_summary)):
        names = [v for v in VARIANTS if VARIANTS[v][0] == group]
        rows = {v: collect(v, args, runs, store, from_dirs) for v in names}
        names = [v for v in names if rows[v]]
        if not names:
            continue
        body += [f"## {title}", ""]
        for v in names:
            _, flagfile, extra, _, what = VARIANTS[v]
            command = " ".join([f"bin/train --flagfile={flagfile}", *extra])
            body.append(f"* `{v}`: {what}: `{command}`")
        body += ["", "### Summary", ""] + summary_fn(names, rows)
        body += ["", "### Per run", "", header, "|" + "---|" * (header.count("|") - 1)]
        for v in names:
            body += [row_fn(v, s, r) for s, r in rows[v]]
            reported += [(f"mnist_{v}_s{s}", r) for s, r in rows[v]]
        body.append("")
    source = f"rows read back from `{args.runs}`"
    stored = [r for k, r in reported if k not in from_dirs]
    rounded = [r for r in stored if not r["source"].startswith("run directory")]
    if stored:
        source += (f", or from `{args.store}`, the committed copy of every run's numbers, for "
                   f"the {len(stored)} of {len(reported)} runs whose directory is gone")
    if rounded:
        source += (f": {len(rounded)} of these were copied from this file's earlier tables, so "
                   "they are rounded to 0.1 points and 1 s and a summary over them can differ "
                   "in its last digit from the one computed at full precision")
    lines = ["# MNIST eps 0.3: recipes that train, per seed", "",
             f"Produced by `{study_command.strip()}` ({source}; `--report_only` "
             "rebuilds this file without training). Every number is one run; failures are rows "
             "too. `train s`: seconds of training on this 2-core CPU (graph mode), including any "
             "failed attempt that was restarted; runs shared the CPU with other jobs, so compare "
             "times only within a recipe pair. `val PGD-10 e1`: validation robust accuracy after "
             "epoch 1 (with a warm-up, still at a small epsilon).", "", *body]
    orphans = sorted(k for k, r in store["runs"].items() if r["variant"] not in VARIANTS)
    if orphans:
        print(f"in {args.store} but not reported (variant not in VARIANTS): {', '.join(orphans)}")
    save_store(store, store_path)
    out = REPO / args.output
    existing = out.read_text() if out.exists() else ""
    marker = "<!-- analysis -->"
    analysis = existing[existing.index(marker):] if marker in existing else marker + "\n"
    out.write_text("\n".join(lines) + "\n" + analysis)
    print(f"wrote {out}")


def _last(curve):
    return [c for c in curve if c is not None]


def _recipe_row(v, seed, r):
    val, adv = _last(r["val_curve"]), _last(r["train_attack_curve"])
    return (f"| {v} | {seed} | {pct(r['clean'])} | {pct(r['pgd20'])} | {pct(r['pgd100'])} | "
            f"{pct(r['aa_lite'])} | {r['strong_n']} | {pct(r['aa'])} | "
            f"{pct(val[0] if val else None)} | "
            f"{pct(adv[-1] if adv else None)} | {r['train_s']:.0f} |")


def _recipe_summary(names, rows):
    out = ["| variant | runs | failed (AA-lite < 50 %) | clean % | PGD-20 % | AA-lite %, all runs | "
           "AA-lite %, runs not failed | train s |", "|---|---|---|---|---|---|---|---|"]
    for v in names:
        rs = [r for _, r in rows[v]]
        every = [r["aa_lite"] for r in rs if r["aa_lite"] is not None]
        ok = [a for a in every if a >= FAIL]
        out.append(f"| {v} | {len(rs)} | {len(every) - len(ok)} | "
                   f"{reproduce.fmt([r['clean'] for r in rs])} | "
                   f"{reproduce.fmt([r['pgd20'] for r in rs])} | {reproduce.fmt(every)} | "
                   f"{reproduce.fmt(ok)} | {statistics.mean(r['train_s'] for r in rs):.0f} |")
    return out


def _wong_row(v, seed, r):
    adv = _last(r["train_attack_curve"])
    return (f"| {v} | {seed} | {pct(r['wong_clean'])} | {pct(r['wong'])} | "
            f"{pct(r.get('aa_lite_1000'))} | {pct(r.get('pgd20_1000'))} | {pct(r['pgd20'])} | "
            f"{pct(adv[-1] if adv else None)} | {r['train_s']:.0f} |")


def _wong_summary(names, rows):
    out = ["| variant | runs | PGD-50x10 %, mean ± sd | min % | seeds below 75 % | "
           "AA-lite % (runs measured) | clean % | train s |",
           "|---|---|---|---|---|---|---|---|"]
    for v in names:
        rs = [r for _, r in rows[v]]
        w = [r["wong"] for r in rs]
        aa = [r.get("aa_lite_1000") for r in rs if r.get("aa_lite_1000") is not None]
        out.append(f"| {v} | {len(rs)} | {reproduce.fmt(w)} | {pct(min(w))} | "
                   f"{sum(x < WONG_FAIL for x in w)} | "
                   f"{reproduce.fmt(aa) + f' ({len(aa)})' if aa else '-'} | "
                   f"{reproduce.fmt([r['wong_clean'] for r in rs])} | "
                   f"{statistics.mean(r['train_s'] for r in rs):.0f} |")
    return out


if __name__ == "__main__":
    main()
