"""Is this run healthy? The checks that judge a robust-training run, and what follows.

Robust training fails in ways the loss does not show: catastrophic overfitting
(the model beats its own single-step training attack but not PGD) and gradient
masking (PGD overestimates robustness that a stronger attack removes). This
module gathers the judgments made around a run:

* the probes built for it: the failure check (:func:`make_failure_detector`,
  ``--failure_*``, an epoch-end check that restarts a failed attempt) and the
  catastrophic-overfitting guard (:func:`make_co_guard`, ``--co_guard*``, a
  check every N steps that rolls back);
* the final verdicts on the exported model: NOT ROBUST
  (:func:`robustness_gap_warning`), OVERESTIMATED (:func:`final_autoattack`,
  :func:`overestimate_warning`);
* when every attempt failed, which one to keep (:func:`keep_least_bad`).

The mechanisms themselves live in ``callbacks.FailureDetector`` and
``co_guard.COGuard``; BUILD_NOTES.md ("Run health") describes how they are
to become one.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tf_backsmooth import config as config_lib
from tf_backsmooth import data as data_lib
from tf_backsmooth import fileio, run_dir

log = logging.getLogger("tf_backsmooth")


def make_failure_detector(config, train, is_chief=True):
    """The ``--failure_restarts`` check; with ``--failure_data=train`` it
    attacks a fixed subset of the training images chosen by the run's
    seed (each attempt its own subset)."""
    from tf_backsmooth import callbacks as cb

    subset = {}
    if config.failure_data == "train":
        n = min(config.failure_examples, len(train[1]))
        pick = np.sort(np.random.default_rng([config.seed, 7]).choice(
            len(train[1]), n, replace=False))
        subset = dict(x=data_lib.to_float(train[0][pick]), y=train[1][pick],
                      pgd_steps=config.failure_pgd_steps or config.eval_pgd_steps,
                      seed=config.seed, overestimate_gap=config.failure_overestimate_gap)
    return cb.FailureDetector(config.epsilon, config.failure_gap,
                              config.failure_warmup_gap,
                              from_epoch=config.failure_from_epoch,
                              record_path=os.path.join(config.model_dir, run_dir.FAILURE_RECORD),
                              is_chief=is_chief, **subset)


def make_co_guard(config, train, is_chief=True):
    """The catastrophic-overfitting guard on a fixed, seeded training subset."""
    from tf_backsmooth.co_guard import COGuard

    n = min(config.co_guard_examples, len(train[1]))
    pick = np.random.default_rng(config.seed).choice(len(train[1]), n,
                                                     replace=False)
    log_dir = (os.path.join(config.model_dir, "tensorboard")
               if config.tensorboard and is_chief else None)
    return COGuard(
        data_lib.to_float(train[0][pick]), train[1][pick],
        every_steps=config.co_guard_every, pgd_steps=config.co_guard_pgd_steps,
        drop=config.co_guard_drop, gap=config.co_guard_gap,
        rule=config.co_guard_rule, floor=config.co_guard_floor,
        policy=config.co_guard_policy, factor=config.co_guard_factor,
        fallback=config.co_guard_fallback,
        max_collapses=config.co_guard_max_collapses,
        model_dir=config.model_dir, log_dir=log_dir, seed=config.seed,
        is_chief=is_chief)


# A final robust test accuracy this far below the accuracy on the method's own
# training attack (last epoch) is the signature of catastrophic overfitting or
# gradient masking: in docs/MNIST_STUDY.md every failed run had a gap of 0.26
# or more, every healthy one 0.10 or less.
ROBUSTNESS_GAP = config_lib.FAILURE_GAP


def robustness_gap_warning(model_dir, robust_accuracy):
    """A warning (or None) when the model beats its own training attack far
    more often than PGD: the run "trained" but is not robust."""
    records = fileio.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    train_adv = records[-1].get("adv_accuracy") if records else None
    if train_adv is None:
        return None  # natural training: no training attack
    gap = train_adv - robust_accuracy
    if gap <= ROBUSTNESS_GAP:
        return None
    return (f"the model is {100 * train_adv:.1f} % accurate on its own training attack "
            f"but {100 * robust_accuracy:.1f} % under the PGD test attack (gap "
            f"{100 * gap:.1f} points > {100 * ROBUSTNESS_GAP:.0f}): the signature of "
            "catastrophic overfitting or gradient masking, so this run is probably not "
            "robust. Remedies: an epsilon warm-up (--epsilon_warmup_epochs), "
            "--failure_restarts=2, --co_guard, or a multi-step method such as TRADES-10 "
            "(see docs/MNIST_STUDY.md)")


# PGD accuracy minus autoattack_lite accuracy, on the same test images, above
# which the final report warns that PGD overestimates robustness (gradient
# masking). Measured in docs/MNIST_STUDY.md section 18 (PGD-20 against
# autoattack_lite on the first 1000 test images): models that train well, 2.7-7.3
# points; N-FGSM's weak runs 10.0-11.1; Wong et al.'s recipe 4.5-38.0 (their own
# script's runs up to 48.0). A choice above the first group, not a separation.
OVERESTIMATE_GAP = 0.10


def overestimate_warning(pgd_accuracy, autoattack_accuracy, examples, pgd_steps):
    """A warning (or None) when PGD-``pgd_steps`` leaves more than
    ``OVERESTIMATE_GAP`` more of the same ``examples`` test images robust than
    autoattack_lite does."""
    gap = pgd_accuracy - autoattack_accuracy
    if gap <= OVERESTIMATE_GAP:
        return None
    return (f"PGD-{pgd_steps} overestimates this model's robustness: on the first "
            f"{examples} test images {100 * pgd_accuracy:.1f} % survive PGD-{pgd_steps} "
            f"but {100 * autoattack_accuracy:.1f} % survive autoattack_lite (gap "
            f"{100 * gap:.1f} points > {100 * OVERESTIMATE_GAP:.0f}): a sign of gradient "
            "masking. Quote the autoattack_lite number, or evaluate with bin/evaluate "
            "--attacks=autoattack")


def pgd_verdicts(report):
    """The per-example PGD verdicts (True = robust) of a one-epsilon
    ``evaluation.evaluate(..., per_example=True)`` report."""
    return next(v for k, v in report["per_example"].items() if k != "clean")["pgd"]


def final_autoattack(model, x, y, epsilon, pgd_robust, *, examples, pgd_steps, seed,
                     progress=False):
    """autoattack_lite (APGD-CE, then APGD-T on what it left) on the first
    ``examples`` of ``(x, y)``, with the final evaluation's seed, against the
    final PGD-``pgd_steps`` evaluation's own verdicts on them (``pgd_robust``,
    per example, in the order of ``x``: random starts are keyed on the
    example's index, so the first N verdicts of the whole test set are the
    first N images'; PGD is not run again). Returns ``(record, warning or
    None)``; the record goes into results.json as ``autoattack_lite``."""
    from tf_backsmooth import evaluation
    n = min(int(examples), len(y))
    log.info("final test evaluation: autoattack_lite on the first %d test images", n)
    report = evaluation.evaluate(model, x[:n], y[:n], [epsilon], attacks=("autoattack_lite",),
                                 seed=seed, progress=progress, per_example=True)
    acc = next(iter(report["attacks"].values()))
    lite = np.asarray(next(v for k, v in report["per_example"].items()
                           if k != "clean")["autoattack_lite"], bool)
    pgd = np.asarray(pgd_robust[:n], bool)
    record = {
        "test_examples": n,
        "clean_accuracy": float(report["clean_accuracy"]),
        "pgd_accuracy": float(pgd.mean()),
        "apgd_ce_accuracy": float(acc["apgd_ce"]),
        "autoattack_lite_accuracy": float(lite.mean()),
        "robust_accuracy": float((pgd & lite).mean()),
        "attack": (f"autoattack_lite: APGD-CE, then APGD-T ({report['settings']['apgd_targets']} "
                   f"targets) on what it left, {report['settings']['apgd_steps']} "
                   "iterations each; pgd_accuracy: the final PGD-"
                   f"{pgd_steps} evaluation on the same images; robust_accuracy: worst case "
                   "of both"),
        "seconds": float(report["seconds"]),
        "evaluation_warnings": report.get("warnings", []),
    }
    return record, overestimate_warning(record["pgd_accuracy"],
                                        record["autoattack_lite_accuracy"], n, pgd_steps)


def describe_failure(failed):
    """Why an attempt failed the check, from its record (``FailureDetector.failed``)."""
    on = "training-image" if "train_robust_accuracy" in failed else "validation"
    pgd = failed.get("val_robust_accuracy", failed.get("train_robust_accuracy"))
    text = (f"{100 * failed['adv_accuracy']:.1f} % accurate on its own training attack, "
            f"{100 * pgd:.1f} % under {on} PGD")
    if "train_autoattack_accuracy" in failed:
        text += (f", {100 * failed['train_autoattack_accuracy']:.1f} % under autoattack_lite "
                 "on the same images")
        if failed.get("overestimated"):
            text += " (PGD overestimates it: gradient masking)"
    return text


def check_score(config, detector, val, model):
    """Robust accuracy of ``model`` under the failure check's own attack and
    images: PGD-``failure_pgd_steps`` on the detector's training images (the
    worst case of it and autoattack_lite with ``failure_overestimate_gap``),
    or PGD-``eval_pgd_steps`` on the validation split."""
    from tf_backsmooth import evaluation

    if detector.x is not None:
        return detector.robust_accuracy(model)
    report = evaluation.evaluate(model, data_lib.to_float(val[0]), val[1], [config.epsilon],
                                 attacks=("pgd",), batch_size=detector.batch_size,
                                 pgd_steps=config.eval_pgd_steps, seed=config.seed)
    return float(report["robust_accuracy"])


def keep_least_bad(config, model, detector, attempts, val):
    """Every attempt failed the check (the last one allowed trained on):
    loads into ``model`` the attempt whose weights are the most accurate
    under the check (:func:`check_score`, all on the same images and draws)
    and returns ``(kept, scores, epochs)``: the 1-based attempt number, every
    attempt's score (None for one whose checkpoint cannot be read) and the
    epoch of each failed attempt's weights. A failed attempt's candidate is
    what it would have exported: its best epoch by validation
    (``best.weights.h5``) when it has one, else its newest checkpoint (the
    failed epoch); the last attempt's is ``model``'s own (already selected)
    weights. Ties keep the later attempt."""
    from tf_backsmooth import callbacks as cb

    state = cb.training_state(model)
    last = [np.array(v.numpy()) for v in state]
    arrays, scores, epochs = {}, [], []
    for number, attempt in enumerate(attempts, 1):
        folder = os.path.join(config.model_dir, attempt.get("folder", f"attempt_{number}"))
        try:
            epoch = cb.Backup(os.path.join(folder, run_dir.BACKUP)).restore(model)
        except cb.CheckpointError as err:
            epoch = 0
            log.warning("attempt %d cannot be compared: %s", number, err)
        if epoch == 0:
            scores.append(None)
            epochs.append(None)
            continue
        best = cb.BestCheckpoint(folder).read()
        if best.restore_best(model.base_model):
            epoch = best.best_epoch
        arrays[number] = [np.array(v.numpy()) for v in state]
        scores.append(check_score(config, detector, val, model.base_model))
        epochs.append(int(epoch))
    for var, value in zip(state, last):
        var.assign(value)
    scores.append(check_score(config, detector, val, model.base_model))
    kept = max(range(len(scores)), key=lambda i: (-1.0 if scores[i] is None
                                                  else scores[i], i)) + 1
    if kept in arrays:
        for var, value in zip(state, arrays[kept]):
            var.assign(value)
    return kept, scores, epochs


def choose_least_bad(config, model, detector, attempts, val, selected):
    """Every attempt failed the check: loads the least bad one's weights into
    ``model`` (:func:`keep_least_bad`) and returns what the run reports:
    ``least_bad`` (for results.json), ``text`` (the selected weights),
    ``metrics_dir`` and ``seed`` of the kept attempt (None: the last one) and
    the LEAST BAD ``warning``, also logged. ``selected`` names the last
    attempt's selected weights."""
    log.info("every attempt (%d) failed the check: measuring each one's weights under it to "
             "keep the least bad", len(attempts) + 1)
    kept, scores, epochs = keep_least_bad(config, model, detector, attempts, val)
    what = (f"PGD-{detector.pgd_steps}"
            + (" and autoattack_lite (worst case)"
               if detector.overestimate_gap is not None else "")
            + f" on {len(detector.y)} training images"
            if detector.x is not None else
            f"PGD-{config.eval_pgd_steps} on the validation split")
    out = {"least_bad": {"kept_attempt": kept, "check": what, "robust_accuracy": scores},
           "metrics_dir": None, "seed": None}
    shown = ", ".join("unreadable" if a is None else f"{100 * a:.1f} %" for a in scores)
    if kept <= len(attempts):
        folder = attempts[kept - 1].get("folder", f"attempt_{kept}")
        out["metrics_dir"] = os.path.join(config.model_dir, folder)
        out["seed"] = attempts[kept - 1]["seed"]
        out["text"] = (f"attempt {kept} of {len(attempts) + 1} (epoch "
                       f"{epochs[kept - 1]}, in {folder}/), the least bad")
    else:
        out["text"] = f"{selected}, attempt {kept} (the last), the least bad"
    out["warning"] = (
        f"every one of the {len(attempts) + 1} attempts failed the check; the exported "
        f"weights are attempt {kept}'s, the most accurate under {what} ({shown} for "
        f"attempts 1-{len(attempts) + 1}). To try again, train in a new --model_dir with "
        f"another --seed (the same seed repeats these {len(attempts) + 1} attempts), with "
        "more attempts if needed (--failure_restarts), or use a method that fails less "
        "often at this epsilon (docs/GUIDE.md)")
    log.warning("LEAST BAD: %s", out["warning"])
    return out
