"""A run directory: its files, its lock, and the record of training attempts.

``bin/train`` writes everything of a run into ``--model_dir``: ``config.json``
(what was asked), ``manifest.json`` (what ran), ``metrics.jsonl``,
``results.json`` (present only once the run finished), checkpoints in
``backup/`` and, after a failed attempt, ``attempts.json`` and the attempt's
files moved to ``attempt_<k>/``. This module owns those names and the rules:
a finished run is never overwritten without ``overwrite``; a different
configuration never resumes into an unfinished run; one process holds
``run.lock``; nothing of a failed attempt is deleted. No TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from tf_backsmooth import config as config_lib
from tf_backsmooth import fileio

log = logging.getLogger("tf_backsmooth")

RESULTS = "results.json"
CONFIG = "config.json"
MANIFEST = "manifest.json"
BACKUP = "backup"
ATTEMPTS = "attempts.json"
# The failure of the last attempt allowed (FailureDetector.record_path).
FAILURE_RECORD = "failure.json"
# Files of one training attempt, moved to attempt_<k>/ when it is restarted.
ATTEMPT_FILES = ("metrics.jsonl", "best.json", "best.weights.h5", BACKUP,
                  "tensorboard", "co_guard", FAILURE_RECORD)


class RunError(RuntimeError):
    """The run cannot start or finish; the message says why and what to do."""


# ----------------------------------------------------------------- run dir


#: The version of config.json's layout this package writes and reads. Runs
#: written with an older layout resume (every field added since is absent at
#: its default); a newer one is refused, naming both versions.
CONFIG_SCHEMA = 2  # 1: tf_backsmooth 0.1.0, which wrote no "schema_version"


def config_payload(config):
    """What ``config.json`` records of ``config`` (compared on resume), with its
    ``schema_version``."""
    payload = config_lib.as_dict(config)
    payload["schema_version"] = CONFIG_SCHEMA
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
                         ("test_autoattack_examples", 0), ("failure_overestimate_gap", 1.0),
                         ("curve_every", 0), ("curve_examples", 1000)):
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
        written = previous.pop("schema_version", 1) if isinstance(previous, dict) else None
        if not isinstance(written, int) or written > CONFIG_SCHEMA:
            raise RunError(
                f"model_dir {model_dir!r} holds a run whose config.json has schema version "
                f"{written!r}; this tf_backsmooth reads versions 1 to {CONFIG_SCHEMA}: resume it "
                "with the tf_backsmooth that started it, or use another --model_dir")
        current = json.loads(json.dumps(config_payload(config)))
        current.pop("schema_version")
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current)
                             if previous.get(k) != current.get(k))
            raise RunError(
                f"model_dir {model_dir!r} holds an unfinished run with a "
                f"different configuration (differs in: {', '.join(changed)}; config.json schema "
                f"version {written}, this tf_backsmooth's {CONFIG_SCHEMA}); use the same flags "
                "to resume, or another --model_dir")
        if written < CONFIG_SCHEMA:
            log.info("resuming a run whose config.json has schema version %d (this "
                     "tf_backsmooth writes %d)", written, CONFIG_SCHEMA)
    resuming = os.path.exists(os.path.join(model_dir, BACKUP))
    if is_chief:
        os.makedirs(model_dir, exist_ok=True)
    return resuming


def total_epoch_seconds(model_dir):
    """Training time summed over epochs of all processes of this run."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    by_epoch = {r["epoch"]: r.get("epoch_seconds", 0.0)
                for r in fileio.read_jsonl(path)}
    return float(sum(by_epoch.values()))


def recorded_config(path):
    """The ``config.json`` of the run that ``path`` names (its directory, or a
    file in it, e.g. its ``model.keras``) as a dict; ``{}`` when there is none
    or it cannot be read."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        recorded = fileio.read_json(os.path.join(folder, CONFIG), default={})
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def attempt_seed(seed, attempt):
    """The seed of training attempt ``attempt`` (0: the configured seed)."""
    return (seed + 1_000_003 * attempt) % (2**31 - 1)


def read_attempts(model_dir):
    return fileio.read_json(os.path.join(model_dir, ATTEMPTS), default=[])


def archive_attempt(model_dir, number, attempts, rollback_epoch=0):
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
    for name in ATTEMPT_FILES:
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


def discarded_cost(model_dir, rollback_epoch, train_seconds, grad_evals):
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


def rollback_epoch(config, failed_epoch, model_dir):
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


def manifest(config, model, strategy_name, num_replicas):
    """What ran (``manifest.json``): versions, devices, strategy, XLA state,
    CPU kernels, seed and the method's parameters."""
    import platform
    import sys

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
        "source_commit": source_commit(),
    }


def source_commit():
    """The git commit of the tf_backsmooth source in use (with ``+dirty`` when
    its tracked files are modified), or None outside a git checkout."""
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def model_card(config, results, manifest):
    """``results.json``'s ``model_card``: RobustBench's fields (clean and
    robust accuracy, threat model, eps, test examples, architecture; the
    robust number is autoattack_lite's when the run measured it, else the
    final PGD's, and ``robust_attack`` says which) plus what the training
    cost and where it ran: seconds, gradient evaluations, hardware, commit."""
    strong = results.get("autoattack_lite")
    return {
        "dataset": config.dataset,
        "threat_model": "Linf",
        "eps": config.epsilon,
        "architecture": config.model,
        "training_method": config.method,
        "additional_data": False,
        "number_forward_passes": 1,
        "clean_acc": round(100 * results["clean_accuracy"], 2),
        "robust_acc": round(100 * (strong["autoattack_lite_accuracy"] if strong
                                   else results["robust_accuracy"]), 2),
        "robust_attack": ("autoattack_lite (APGD-CE + APGD-T)" if strong
                          else results["robust_attack"]),
        "robust_test_examples": strong["test_examples"] if strong else results["test_examples"],
        "clean_test_examples": results["test_examples"],
        "epochs": config.epochs,
        "train_seconds": results["train_seconds"],
        "grad_evals": results["grad_evals"],
        "hardware": {"devices": manifest.get("devices"),
                     "cpu": manifest.get("cpu_kernels", {}).get("model"),
                     "cores": manifest.get("cpu_kernels", {}).get("cores")},
        "tensorflow": manifest.get("tensorflow"),
        "tf_backsmooth": manifest.get("tf_backsmooth"),
        "commit": manifest.get("source_commit"),
        "seed": results["seed"],
    }
