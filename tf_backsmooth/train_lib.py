"""One training run from a frozen :class:`~tf_backsmooth.config.TrainConfig`.

``run(config)`` does, in order, and fails before any training on bad input:

1. checks the run directory (a finished run is never overwritten without
   ``overwrite=True``; a different config never resumes into it);
2. loads the data (clear :class:`~tf_backsmooth.data.DataError` otherwise);
3. builds strategy, model, optimizer and schedule, and compiles;
4. writes ``config.json`` and ``manifest.json`` (versions, devices, XLA state
   actually used, seed);
5. trains with robust validation, best-checkpoint selection, backup/resume,
   TensorBoard and NaN handling;
6. evaluates the selected weights on the test split (clean + PGD) and writes
   ``results.json`` and the exported classifier ``model.keras``.

No absl flags are read here; ``bin/train`` builds the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time

import numpy as np

from tf_backsmooth import config as config_lib
from tf_backsmooth import cpu, fileio

log = logging.getLogger("tf_backsmooth")

RESULTS = "results.json"
CONFIG = "config.json"
MANIFEST = "manifest.json"
BACKUP = "backup"


class RunError(RuntimeError):
    """The run cannot start or finish; the message says why and what to do."""


# ----------------------------------------------------------------- run dir
def _config_payload(config):
    payload = config_lib.as_dict(config)
    # Fields that may change between a run and its resumption.
    for key in ("verbose", "overwrite"):
        payload.pop(key, None)
    # Added after 0.1.0 (lr_boundaries, failure_warmup_gap, failure_rollback):
    # absent when unused, so runs started before resume.
    if not payload.get("lr_boundaries"):
        payload.pop("lr_boundaries", None)
    if payload.get("failure_warmup_gap") == 1.0:
        payload.pop("failure_warmup_gap", None)
    if not payload.get("failure_rollback"):
        payload.pop("failure_rollback", None)
    # Added later still, one at a time: absent at their defaults, so runs
    # started before each of them resume.
    for key, default in (("failure_data", "validation"), ("failure_examples", 1000),
                         ("failure_from_epoch", 0), ("failure_pgd_steps", 0),
                         ("test_autoattack_examples", 0), ("failure_overestimate_gap", 1.0)):
        if payload.get(key) == default:
            payload.pop(key, None)
    return payload


def _check_is_dir(model_dir):
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise RunError(f"model_dir {model_dir!r} exists and is not a directory")


def claim_model_dir(model_dir):
    """Creates ``model_dir``, proves it writable (a probe file is created,
    written, fsynced and deleted) and locks it against a second run; returns
    the held :class:`fileio.RunLock`. Raises RunError (one line) otherwise."""
    _check_is_dir(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
        fileio.check_writable(model_dir)
    except OSError as err:
        raise RunError(f"model_dir {model_dir!r} is not a writable directory: "
                       f"{fileio.describe(err)}") from None
    lock = fileio.RunLock(model_dir)
    try:
        previous = lock.acquire()
    except fileio.LockedError as err:
        raise RunError(
            f"model_dir {model_dir!r} is in use by another run ({err}); wait "
            "for it to finish or stop it, or choose another --model_dir"
        ) from None
    if previous:
        log.info("model_dir lock taken over (last held by %s)", previous)
    fileio.remove_stale_temporaries(model_dir)
    return lock


def prepare_model_dir(config, is_chief=True):
    """Checks (and creates) the run directory; returns whether it resumes."""
    model_dir = config.model_dir
    results = os.path.join(model_dir, RESULTS)
    config_path = os.path.join(model_dir, CONFIG)
    _check_is_dir(model_dir)
    if os.path.exists(results):
        if not config.overwrite:
            raise RunError(
                f"model_dir {model_dir!r} already holds a finished run "
                f"({RESULTS}); pass --overwrite to replace it or choose "
                "another --model_dir")
        if is_chief:  # everything but the lock this process holds
            for name in os.listdir(model_dir):
                path = os.path.join(model_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif name != fileio.LOCK:
                    os.remove(path)
    elif os.path.exists(config_path):
        previous = fileio.read_json(config_path)
        current = json.loads(json.dumps(_config_payload(config)))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current)
                             if previous.get(k) != current.get(k))
            raise RunError(
                f"model_dir {model_dir!r} holds an unfinished run with a "
                f"different configuration (differs in: {', '.join(changed)}); "
                "use the same flags to resume, or another --model_dir")
    resuming = os.path.exists(os.path.join(model_dir, BACKUP))
    if is_chief:
        os.makedirs(model_dir, exist_ok=True)
    return resuming


def _total_epoch_seconds(model_dir):
    """Training time summed over epochs of all processes of this run."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    by_epoch = {r["epoch"]: r.get("epoch_seconds", 0.0)
                for r in fileio.read_jsonl(path)}
    return float(sum(by_epoch.values()))


# -------------------------------------------------------------------- data
def steps_per_epoch(num_examples, batch_size):
    """Full batches per epoch (incomplete final batches are dropped)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise RunError(f"batch_size={batch_size} is larger than the "
                       f"{num_examples} training examples")
    return steps


def train_batches(config, first_epoch):
    """The batches ``run`` trains on: ``data.make_dataset(split="train")``
    for epochs ``first_epoch .. config.epochs-1`` (the one pipeline; see
    :func:`tf_backsmooth.data.dataset_from_arrays` for its rules)."""
    from tf_backsmooth import data as data_lib

    return data_lib.make_dataset(
        config.dataset, "train", config.batch_size, config.data_dir,
        seed=config.seed, num_examples=config.num_train_examples,
        validation_size=config.validation_size, first_epoch=first_epoch,
        epochs=config.epochs)


def train_dataset(x, y, info, batch_size, seed, first_epoch, epochs, augment):
    """``(batches, steps per epoch)`` of :func:`train_batches`' pipeline on
    arrays (for scripts that hold the arrays): epochs ``first_epoch ..
    epochs-1``, each a permutation keyed on ``(seed, epoch)``, incomplete
    final batches dropped, augmentation keyed on the global step."""
    from tf_backsmooth import data as data_lib

    steps = steps_per_epoch(len(y), batch_size)
    return data_lib.dataset_from_arrays(
        x, y, batch_size, seed=seed, shuffle=True, augment=augment,
        hflip=info.hflip, drop_remainder=True, first_epoch=first_epoch,
        epochs=epochs), steps


def _to_float(x):
    return x.astype(np.float32) / 255.0


def load_data(config):
    """All arrays of a run; raises DataError before any model is built."""
    from tf_backsmooth import data as data_lib

    info = data_lib.get_info(config.dataset)
    train = data_lib.load_arrays(config.dataset, "train", config.data_dir,
                                 config.validation_size,
                                 num_examples=config.num_train_examples)
    val = None
    if config.eval_every:
        val_size = (info.validation_size if config.validation_size is None
                    else config.validation_size)
        if val_size == 0:
            raise config_lib.ConfigError(
                "eval_every > 0 needs a validation split: set validation_size "
                "> 0 or eval_every=0")
        val = data_lib.load_arrays(config.dataset, "validation",
                                   config.data_dir, config.validation_size,
                                   num_examples=min(config.eval_examples,
                                                    val_size))
    test = data_lib.load_arrays(config.dataset, "test", config.data_dir,
                                num_examples=config.test_examples)
    return info, train, val, test


# ----------------------------------------------------------------- building
def make_schedule(config, steps_per_epoch):
    import keras

    total = config.epochs * steps_per_epoch
    lr = config.lr
    if config.lr_schedule == "constant":
        return lr
    if config.lr_schedule == "piecewise":
        if config.lr_boundaries:
            bounds = [int(round(b * steps_per_epoch)) for b in config.lr_boundaries]
            # Boundaries closer than one step would share a step: keep them
            # strictly increasing (PiecewiseConstantDecay's requirement).
            for i in range(1, len(bounds)):
                bounds[i] = max(bounds[i], bounds[i - 1] + 1)
        else:
            bounds = [max(1, int(total * 0.5)), max(2, int(total * 0.75))]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [lr / 10 ** i for i in range(len(bounds) + 1)])
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, max(total, 1))
    # cyclic: linear 0 -> lr over the first 40%, then lr -> 0 (Wong et al.).
    return CyclicSchedule(lr, total)


def _cyclic_class():
    import keras

    @keras.saving.register_keras_serializable("tf_backsmooth")
    class _CyclicSchedule(keras.optimizers.schedules.LearningRateSchedule):
        """Triangular one-cycle schedule: 0 -> peak at 40% -> 0 at the end."""

        def __init__(self, peak, total_steps):
            self.peak, self.total_steps = float(peak), int(max(total_steps, 1))

        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            up = self.total_steps * 0.4
            rise = step / up
            fall = (self.total_steps - step) / (self.total_steps - up)
            return self.peak * keras.ops.clip(
                keras.ops.minimum(rise, fall), 0.0, 1.0)

        def get_config(self):
            return {"peak": self.peak, "total_steps": self.total_steps}

    return _CyclicSchedule


def CyclicSchedule(peak, total_steps):  # noqa: N802
    return _cyclic_class()(peak, total_steps)


def make_optimizer(config, steps_per_epoch):
    import keras

    schedule = make_schedule(config, steps_per_epoch)
    # Weight decay is Keras' decoupled form (w -= lr * wd * w) for every
    # optimizer; the PyTorch references add wd * w to the gradient before
    # momentum instead. See BUILD_NOTES.md.
    wd = config.weight_decay or None
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=config.momentum,
                                    weight_decay=wd)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(schedule, weight_decay=wd)
    return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)


def make_classifier(config, info):
    """The base classifier of ``config`` (normalisation and init as set)."""
    from tf_backsmooth import models

    mean, std = (info.mean, info.std) if config.normalize else (None, None)
    return models.get(config.model, info.num_classes, info.input_shape,
                      mean=mean, std=std, init=config.init)


def build_model(config, info, steps_per_epoch=None):
    """Base classifier + RobustModel (call under the strategy scope).

    ``steps_per_epoch`` converts ``epsilon_warmup_epochs`` into steps; it is
    required when a warm-up is configured.
    """
    import keras

    from tf_backsmooth import schedules
    from tf_backsmooth.robust_model import RobustModel

    keras.utils.set_random_seed(config.seed)
    base = make_classifier(config, info)
    if config.sync_batchnorm:
        for layer in base._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True  # read by BatchNormalization._moments
    attack_kw = {}
    if config.method != "natural":
        attack_kw = dict(epsilon=config.epsilon, step_size=config.step_size,
                         steps=config.steps)
    if config.epsilon_warmup_epochs:
        if steps_per_epoch is None:
            raise ValueError("build_model needs steps_per_epoch for "
                             "epsilon_warmup_epochs")
        attack_kw["epsilon_schedule"] = schedules.EpsilonWarmup(
            config.epsilon, schedules.warmup_steps(
                config.epsilon_warmup_epochs, steps_per_epoch))
    return RobustModel(base, method=config.method, gamma=config.gamma,
                       beta=config.beta, seed=config.seed, **attack_kw,
                       **dict(config.method_kwargs))


def bfloat16_warning(dtype_policy, units, accelerator):
    """A warning (or None) for ``mixed_bfloat16`` on a CPU that reports no
    bfloat16 units (``units == []``; None = unknown: no warning)."""
    if dtype_policy != "mixed_bfloat16" or accelerator is not None or units != []:
        return None
    return ("--dtype_policy=mixed_bfloat16 on a CPU that reports no bfloat16 units "
            f"({' / '.join(cpu.BF16_FLAGS)} absent from /proc/cpuinfo): its bfloat16 "
            "matrix products are not native here, so this may train slower than float32 "
            "(the measured 2-2.6x gains were on a CPU with AMX). Time both first: python "
            "bench/vs_pytorch.py --precisions=float32,bfloat16")


def manifest(config, model, strategy_name, num_replicas):
    import keras
    import tensorflow as tf

    from tf_backsmooth import __version__, cpu, fastgrad, fused_bn

    return {
        "tf_backsmooth": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "strategy": strategy_name,
        "num_replicas": num_replicas,
        "xla": {"requested": str(config.jit_compile), "used": model.xla,
                "reason": model.xla_reason},
        "attack_conv_input_gradient": fastgrad.describe(),
        "training_batchnorm": (fused_bn.describe() if not model.batch_independent
                               else "no BatchNorm layer"),
        "dtype_policy": config.dtype_policy,
        "cpu_bfloat16_units": cpu.bfloat16_units(cpu.cpu_flags()),
        "cpu_kernels": cpu.describe(),
        "seed": config.seed,
        "method": config.method,
        "params": config_lib.as_dict(model.params),
        "command": " ".join(sys.argv),
    }


def make_callbacks(config, model, val, global_batch, is_chief=True,
                   train=None):
    import keras

    from tf_backsmooth import callbacks as cb

    nan_guard = cb.NaNGuard()
    out = []
    if config.co_guard:
        # First, so a rollback happens before the other callbacks see a step.
        out.append(make_co_guard(config, train, is_chief))
    if val is not None:
        x_val = _to_float(val[0])
        out.append(cb.RobustValidation(
            x_val, val[1], config.epsilon, steps=config.eval_pgd_steps,
            every=config.eval_every, seed=config.seed,
            total_epochs=config.epochs))
        out.append(cb.BestCheckpoint(config.model_dir, is_chief=is_chief))
    if config.failure_restarts:
        out.append(make_failure_detector(config, train, is_chief))
    out.append(cb.RunLog(config.model_dir, global_batch, is_chief=is_chief))
    if config.tensorboard and is_chief:
        log_dir = os.path.join(config.model_dir, "tensorboard")
        out.append(keras.callbacks.TensorBoard(log_dir, write_graph=False,
                                               update_freq="epoch"))
        if config.image_summaries and val is not None:
            out.append(cb.AdversarialImages(
                log_dir, _to_float(val[0]), val[1], config.epsilon,
                steps=config.eval_pgd_steps, every=config.eval_every or 1))
    out.append(nan_guard)
    out.append(cb.Backup(os.path.join(config.model_dir, BACKUP), nan_guard,
                         is_chief=is_chief))
    return out, nan_guard


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
        subset = dict(x=_to_float(train[0][pick]), y=train[1][pick],
                      pgd_steps=config.failure_pgd_steps or config.eval_pgd_steps,
                      seed=config.seed, overestimate_gap=config.failure_overestimate_gap)
    return cb.FailureDetector(config.epsilon, config.failure_gap,
                              config.failure_warmup_gap,
                              from_epoch=config.failure_from_epoch,
                              record_path=os.path.join(config.model_dir, FAILURE_RECORD),
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
        _to_float(train[0][pick]), train[1][pick],
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


ATTEMPTS = "attempts.json"
# The failure of the last attempt allowed (FailureDetector.record_path).
FAILURE_RECORD = "failure.json"
# Files of one training attempt, moved to attempt_<k>/ when it is restarted.
_ATTEMPT_FILES = ("metrics.jsonl", "best.json", "best.weights.h5", BACKUP,
                  "tensorboard", "co_guard", FAILURE_RECORD)


def attempt_seed(seed, attempt):
    """The seed of training attempt ``attempt`` (0: the configured seed)."""
    return (seed + 1_000_003 * attempt) % (2**31 - 1)


def _read_attempts(model_dir):
    return fileio.read_json(os.path.join(model_dir, ATTEMPTS), default=[])


def _archive_attempt(model_dir, number, attempts, rollback_epoch=0):
    """Moves a failed attempt's files to ``attempt_<number>/`` (nothing is
    deleted), then records the attempts, so a killed run resumes into the
    next attempt with the right seed.

    ``rollback_epoch`` > 0 (``--failure_rollback``): the next attempt starts
    from that epoch's checkpoint instead of from scratch, so the checkpoint
    and the records of epochs up to it are copied back first (a kill before
    ``attempts.json`` is written replays the failed attempt from there)."""
    folder = os.path.join(model_dir, f"attempt_{number}")
    repeat = 1
    while os.path.exists(folder):  # left by a kill during an earlier archive
        repeat += 1
        folder = os.path.join(model_dir, f"attempt_{number}.{repeat}")
    os.makedirs(folder)
    attempts[-1]["folder"] = os.path.basename(folder)
    for name in _ATTEMPT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            os.replace(path, os.path.join(folder, name))
    if rollback_epoch:
        name = f"epoch-{rollback_epoch}.npz"
        with open(os.path.join(folder, BACKUP, name), "rb") as f:
            data = f.read()
        os.makedirs(os.path.join(model_dir, BACKUP), exist_ok=True)
        fileio.write_bytes(os.path.join(model_dir, BACKUP, name), data)
        kept = [r for r in fileio.read_jsonl(os.path.join(folder, "metrics.jsonl"))
                if r["epoch"] <= rollback_epoch]
        fileio.write_jsonl(os.path.join(model_dir, "metrics.jsonl"), kept)
    fileio.write_json(os.path.join(model_dir, ATTEMPTS), attempts)


def _discarded_cost(model_dir, rollback_epoch, train_seconds, grad_evals):
    """Seconds and gradient evaluations of a failed attempt's epochs after
    ``rollback_epoch`` (those the next attempt does not keep)."""
    if not rollback_epoch:
        return train_seconds, grad_evals
    records = {r["epoch"]: r for r in
               fileio.read_jsonl(os.path.join(model_dir, "metrics.jsonl"))}
    kept = records.get(rollback_epoch)
    if kept is None:  # no record of that epoch: count nothing as kept
        return train_seconds, grad_evals
    kept_seconds = sum(r.get("epoch_seconds", 0.0) for e, r in records.items()
                       if e <= rollback_epoch)
    return (train_seconds - kept_seconds,
            grad_evals - float(kept.get("grad_evals", 0.0)))


def _rollback_epoch(config, failed_epoch, model_dir):
    """The epoch the next attempt starts from: 0 (from scratch), or with
    ``--failure_rollback`` the start of the failed epoch when its checkpoint
    exists."""
    epoch = failed_epoch - 1 if config.failure_rollback else 0
    if epoch > 0 and not os.path.exists(
            os.path.join(model_dir, BACKUP, f"epoch-{epoch}.npz")):
        log.warning("no checkpoint of epoch %d to roll back to: the next "
                    "attempt starts from scratch", epoch)
        return 0
    return epoch


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
    report = evaluation.evaluate(model, _to_float(val[0]), val[1], [config.epsilon],
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
            epoch = cb.Backup(os.path.join(folder, BACKUP)).restore(model)
        except cb.CheckpointError as err:
            epoch = 0
            log.warning("attempt %d cannot be compared: %s", number, err)
        if epoch == 0:
            scores.append(None)
            epochs.append(None)
            continue
        best = cb.BestCheckpoint(folder)
        best.on_train_begin()
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


def _find(callbacks, cls):
    return next((c for c in callbacks if isinstance(c, cls)), None)


def _total_grad_evals(callbacks):
    """Training gradient evaluations (RunLog) plus the guard's extra ones."""
    from tf_backsmooth import callbacks as cb
    from tf_backsmooth.co_guard import COGuard

    total = _find(callbacks, cb.RunLog).grad_evals
    guard = _find(callbacks, COGuard)
    return float(total + (guard.extra_grad_evals if guard is not None else 0))


def _co_guard_summary(callbacks):
    from tf_backsmooth.co_guard import COGuard

    guard = _find(callbacks, COGuard)
    return guard.summary() if guard is not None else None


def export_classifier(config, info, base):
    """The classifier to evaluate and export: float32, plain BatchNorm.

    Under a mixed-precision policy or with synchronised BatchNorm, the same
    architecture is rebuilt under float32 and given the trained weights
    (variables are float32 in every policy), so evaluation and the exported
    ``model.keras`` run in full precision and carry no training-only
    settings.
    """
    import keras

    if config.dtype_policy == "float32" and not config.sync_batchnorm:
        return base
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = make_classifier(config, info)
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(base.get_weights())
    return clone


# sha256 of all weights (results.json's weights_sha256); shared with the failure check.
weights_fingerprint = fileio.weights_fingerprint


# --------------------------------------------------------------------- run
def run(config, strategy=None, is_chief=True, flags_text=None):
    """Trains and evaluates; returns the results dict (also in results.json).

    ``flags_text`` (the command's flagfile) is saved as ``flags.txt``. The
    global Keras dtype policy is set for the run and restored afterwards.
    The chief holds the run directory's lock (``run.lock``) throughout.
    ``OSError`` from writing the run's files propagates (``bin/train`` turns
    it into one line); every file written before stays usable for a resume.
    """
    import keras

    previous_policy = keras.config.dtype_policy()
    lock = claim_model_dir(config.model_dir) if is_chief else None
    try:
        return _run(config, strategy, is_chief, flags_text)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if lock is not None:
            lock.release()


def _run(config, strategy, is_chief, flags_text):
    import keras

    from tf_backsmooth import distribute, evaluation

    started = time.time()
    prepare_model_dir(config, is_chief)
    info, train, val, test = load_data(config)  # fails fast on bad data
    steps = steps_per_epoch(len(train[1]), config.batch_size)
    if strategy is None:
        strategy = distribute.get_strategy(config.strategy,
                                           config.num_cpu_devices)
    num_replicas = strategy.num_replicas_in_sync
    distribute.check_batch_size(config.batch_size, num_replicas)
    keras.config.set_dtype_policy(config.dtype_policy)
    from tf_backsmooth import fastgrad
    bf16_note = bfloat16_warning(config.dtype_policy, cpu.bfloat16_units(cpu.cpu_flags()),
                                 fastgrad.accelerator())
    if bf16_note and is_chief:
        log.warning("%s", bf16_note)

    from tf_backsmooth import callbacks as cb

    base_config = config
    attempts = _read_attempts(config.model_dir)
    while True:
        # Attempt k > 0 (after k failed ones) trains with its own seed.
        config = dataclasses.replace(
            base_config, seed=attempt_seed(base_config.seed, len(attempts)))
        with strategy.scope():
            model = build_model(config, info, steps)
            model.compile(optimizer=make_optimizer(config, steps),
                          jit_compile=config.jit_compile)
            model.build((None,) + tuple(info.input_shape))
        # jit_compile="auto" may leave XLA vs graph mode to a timing on one
        # batch (RobustModel.measure_xla): done here, so the manifest and the
        # log below record the mode used. Nothing is timed under a strategy.
        per_replica = config.batch_size // num_replicas
        model.measure_xla(_to_float(train[0][:per_replica]),
                          train[1][:per_replica], batch_size=per_replica)
        if is_chief:
            if flags_text is not None:
                fileio.write_text(os.path.join(config.model_dir, "flags.txt"),
                                  flags_text)
            fileio.write_json(os.path.join(config.model_dir, CONFIG),
                              _config_payload(base_config))
            fileio.write_json(os.path.join(config.model_dir, MANIFEST),
                              manifest(config, model, config.strategy,
                                       num_replicas))
        callbacks, nan_guard = make_callbacks(config, model, val,
                                              config.batch_size, is_chief,
                                              train=train)
        backup = _find(callbacks, cb.Backup)
        try:
            first_epoch = backup.restore(model)  # verified, with fallback
        except cb.CheckpointError as err:
            raise RunError(str(err)) from None
        _find(callbacks, cb.RunLog).resume(first_epoch)
        train_ds = train_batches(config, first_epoch)
        log.info("training %s/%s on %s: %d steps/epoch, %d replica(s), XLA %s "
                 "(%s), starting at epoch %d%s", config.method, config.model,
                 config.dataset, steps, num_replicas,
                 "on" if model.xla else "off", model.xla_reason, first_epoch,
                 f" (attempt {len(attempts) + 1}, seed {config.seed})"
                 if attempts else "")
        detector = _find(callbacks, cb.FailureDetector)
        if detector is not None:
            detector.stop_on_failure = len(attempts) < config.failure_restarts
        train_start = time.time()
        # With every epoch done (killed after training) fit runs no epoch but
        # still lets the callbacks read their state back.
        model.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps,
                  initial_epoch=first_epoch, callbacks=callbacks,
                  shuffle=False, verbose=config.verbose if is_chief else 0)
        train_seconds = _total_epoch_seconds(config.model_dir)
        if train_seconds is None:
            train_seconds = time.time() - train_start
        if (detector is None or detector.failed is None
                or not detector.stop_on_failure):
            break
        rollback = _rollback_epoch(config, detector.failed["epoch"],
                                   config.model_dir)
        wasted_seconds, wasted_evals = _discarded_cost(
            config.model_dir, rollback, train_seconds, _total_grad_evals(callbacks))
        attempts.append(dict(detector.failed, seed=config.seed,
                             train_seconds=wasted_seconds,
                             grad_evals=wasted_evals, rollback_epoch=rollback))
        log.warning("FAILED attempt %d (seed %d) at epoch %d: %s; restarting with seed "
                    "%d from %s (%d restart(s) left)",
                    len(attempts), config.seed, detector.failed["epoch"],
                    describe_failure(detector.failed),
                    attempt_seed(base_config.seed, len(attempts)),
                    f"the checkpoint of epoch {rollback}" if rollback else "scratch",
                    base_config.failure_restarts - len(attempts))
        if is_chief:
            _archive_attempt(config.model_dir, len(attempts), attempts, rollback)
        del model, callbacks

    selected = "last"
    best = _find(callbacks, cb.BestCheckpoint)
    warnings = []
    if nan_guard.hit:
        nan_step = int(model.optimizer.iterations.numpy())
        if best is not None and best.restore_best(model.base_model):
            selected = f"best (epoch {best.best_epoch}, after NaN)"
        else:
            good_epoch = backup.restore(model)
            if good_epoch == 0:
                raise RunError(
                    f"the loss became NaN/inf at step {nan_step}, before any "
                    "epoch completed: nothing to keep, nothing exported. Lower "
                    "--lr (or check the data) and start again in another "
                    "--model_dir (or delete this one)")
            selected = f"last good epoch {good_epoch} (after NaN)"
        warnings.append(
            f"the loss became NaN/inf at step {nan_step}: training stopped; "
            f"the evaluated and exported weights are the {selected} ones")
        log.warning("NaN: %s", warnings[-1])
    elif best is not None and best.restore_best(model.base_model):
        selected = f"best (epoch {best.best_epoch}, {best.monitor}=" \
                   f"{best.best:.4f})"

    least_bad, metrics_dir, kept_seed = None, config.model_dir, config.seed
    if (attempts and detector is not None and detector.failed is not None
            and config.failure_keep == "best" and not nan_guard.hit):
        log.info("every attempt (%d) failed the check: measuring each one's "
                 "weights under it to keep the least bad", len(attempts) + 1)
        kept, scores, epochs = keep_least_bad(config, model, detector, attempts, val)
        what = (f"PGD-{detector.pgd_steps}"
                + (" and autoattack_lite (worst case)"
                   if detector.overestimate_gap is not None else "")
                + f" on {len(detector.y)} training images"
                if detector.x is not None else
                f"PGD-{config.eval_pgd_steps} on the validation split")
        least_bad = {"kept_attempt": kept, "check": what, "robust_accuracy": scores}
        shown = ", ".join("unreadable" if a is None else f"{100 * a:.1f} %"
                          for a in scores)
        if kept <= len(attempts):
            folder = attempts[kept - 1].get("folder", f"attempt_{kept}")
            metrics_dir = os.path.join(config.model_dir, folder)
            kept_seed = attempts[kept - 1]["seed"]
            selected = (f"attempt {kept} of {len(attempts) + 1} (epoch "
                        f"{epochs[kept - 1]}, in {folder}/), the least bad")
        else:
            selected = f"{selected}, attempt {kept} (the last), the least bad"
        warnings.append(
            f"every one of the {len(attempts) + 1} attempts failed the check; the "
            f"exported weights are attempt {kept}'s, the most accurate under {what} "
            f"({shown} for attempts 1-{len(attempts) + 1}). To try again, train in "
            f"a new --model_dir with another --seed (the same seed repeats these "
            f"{len(attempts) + 1} attempts), with more attempts if needed "
            "(--failure_restarts), or use a method that fails less often at this "
            "epsilon (docs/MNIST_STUDY.md)")
        log.warning("LEAST BAD: %s", warnings[-1])

    classifier = export_classifier(config, info, model.base_model)
    x_test = _to_float(test[0])
    log.info("final test evaluation: clean and PGD-%d on %d test images",
             config.test_pgd_steps, len(test[1]))
    report = evaluation.evaluate(classifier, x_test, test[1],
                                 [config.epsilon], attacks=("pgd",),
                                 pgd_steps=config.test_pgd_steps,
                                 seed=config.seed,
                                 progress=is_chief and config.verbose > 0,
                                 per_example=bool(config.test_autoattack_examples))
    results = {
        "clean_accuracy": float(report["clean_accuracy"]),
        "robust_accuracy": float(report["robust_accuracy"]),
        "robust_attack": f"PGD-{config.test_pgd_steps} (CE, random start, "
                         f"step 2.5*eps/{config.test_pgd_steps})",
        "epsilon": config.epsilon,
        "test_examples": int(len(test[1])),
        "selected_weights": selected,
        "epochs": config.epochs,
        "train_seconds": train_seconds + sum(a["train_seconds"] for a in attempts),
        "wall_seconds_this_process": time.time() - started,
        "grad_evals": _total_grad_evals(callbacks) + sum(a["grad_evals"] for a in attempts),
        "seed": kept_seed,
        "failed_attempts": attempts,
        "least_bad": least_bad,
        "grad_evals_per_example_per_step": model.method.grad_evals(model.params),
        "steps": int(model.optimizer.iterations.numpy()),
        "nan_stop": nan_guard.hit,
        "xla": model.xla,
        "weights_sha256": weights_fingerprint(classifier),
        "co_guard": _co_guard_summary(callbacks),
        "warnings": warnings + report.get("warnings", []),
    }
    gap_warning = robustness_gap_warning(metrics_dir, results["robust_accuracy"])
    if gap_warning is not None:
        results["warnings"].append(gap_warning)
        if is_chief:
            log.warning("NOT ROBUST: %s", gap_warning)
    if config.test_autoattack_examples:
        strong, strong_warning = final_autoattack(
            classifier, x_test, test[1], config.epsilon, pgd_verdicts(report),
            examples=config.test_autoattack_examples, pgd_steps=config.test_pgd_steps,
            seed=config.seed, progress=is_chief and config.verbose > 0)
        results["autoattack_lite"] = strong
        results["warnings"] += [w for w in strong["evaluation_warnings"]
                                if w not in results["warnings"]]
        if strong_warning is not None:
            results["warnings"].append(strong_warning)
            if is_chief:
                log.warning("OVERESTIMATED: %s", strong_warning)
    if is_chief:
        if results["co_guard"] is not None:  # the manifest records its events
            path = os.path.join(config.model_dir, MANIFEST)
            payload = fileio.read_json(path)
            payload["co_guard"] = results["co_guard"]
            fileio.write_json(path, payload)
        fileio.save_model(classifier, os.path.join(config.model_dir, "model.keras"))
        fileio.write_json(os.path.join(config.model_dir, RESULTS), results)
        # Only now is the run finished: until here a kill resumes from the
        # backup into the final evaluation. After a NaN it is kept.
        if not nan_guard.hit:
            shutil.rmtree(os.path.join(config.model_dir, BACKUP),
                          ignore_errors=True)
    return results
