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
import logging
import os
import shutil
import time

from tf_backsmooth import builders, cpu, fileio, health, moved, run_dir
from tf_backsmooth import config as config_lib
from tf_backsmooth import data as data_lib

log = logging.getLogger("tf_backsmooth")

# -------------------------------------------------------------------- data
def steps_per_epoch(num_examples, batch_size):
    """Full batches per epoch (incomplete final batches are dropped)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise run_dir.RunError(f"batch_size={batch_size} is larger than the "
                       f"{num_examples} training examples")
    return steps


def train_batches(config, first_epoch):
    """The batches ``run`` trains on: ``data.make_dataset(split="train")``
    for epochs ``first_epoch .. config.epochs-1`` (the one pipeline; see
    :func:`tf_backsmooth.data.dataset_from_arrays` for its rules)."""
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
    steps = steps_per_epoch(len(y), batch_size)
    return data_lib.dataset_from_arrays(
        x, y, batch_size, seed=seed, shuffle=True, augment=augment,
        hflip=info.hflip, drop_remainder=True, first_epoch=first_epoch,
        epochs=epochs), steps


def load_data(config):
    """All arrays of a run; raises DataError before any model is built."""
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


@dataclasses.dataclass
class RunCallbacks:
    """The callbacks of one training attempt, in the order ``fit`` runs them
    (:attr:`all`), with the ones the run reads afterwards by name."""

    all: list
    nan_guard: object
    backup: object
    run_log: object
    best: object = None  # BestCheckpoint, with a validation split
    detector: object = None  # FailureDetector, with --failure_restarts
    guard: object = None  # COGuard, with --co_guard

    def grad_evals(self):
        """Training gradient evaluations (RunLog) plus the guard's extra ones."""
        extra = self.guard.extra_grad_evals if self.guard is not None else 0
        return float(self.run_log.grad_evals + extra)


def make_callbacks(config, model, val, global_batch, is_chief=True,
                   train=None, test=None):
    """The :class:`RunCallbacks` of a training attempt."""
    import keras

    from tf_backsmooth import callbacks as cb

    hooks = RunCallbacks([], cb.NaNGuard(), None, None)
    if config.co_guard:
        # First, so a rollback happens before the other callbacks see a step.
        hooks.guard = health.make_co_guard(config, train, is_chief)
        hooks.all.append(hooks.guard)
    if val is not None:
        x_val = data_lib.to_float(val[0])
        hooks.all.append(cb.RobustValidation(
            x_val, val[1], config.epsilon, steps=config.eval_pgd_steps,
            every=config.eval_every, seed=config.seed,
            total_epochs=config.epochs))
        hooks.best = cb.BestCheckpoint(config.model_dir, is_chief=is_chief)
        hooks.all.append(hooks.best)
    if config.failure_restarts:
        hooks.detector = health.make_failure_detector(config, train, is_chief)
        hooks.all.append(hooks.detector)
    if config.curve_every:  # before RunLog, which writes its numbers
        n = min(config.curve_examples, len(test[1]))
        hooks.all.append(cb.ComputeCurve(
            data_lib.to_float(test[0][:n]), test[1][:n], config.epsilon,
            config.curve_every, config.epochs, seed=config.seed))
    hooks.run_log = cb.RunLog(config.model_dir, global_batch, is_chief=is_chief)
    hooks.all.append(hooks.run_log)
    if config.tensorboard and is_chief:
        log_dir = os.path.join(config.model_dir, "tensorboard")
        hooks.all.append(keras.callbacks.TensorBoard(log_dir, write_graph=False,
                                                     update_freq="epoch"))
        if config.image_summaries and val is not None:
            hooks.all.append(cb.AdversarialImages(
                log_dir, data_lib.to_float(val[0]), val[1], config.epsilon,
                steps=config.eval_pgd_steps, every=config.eval_every or 1))
    hooks.backup = cb.Backup(os.path.join(config.model_dir, run_dir.BACKUP),
                             hooks.nan_guard, is_chief=is_chief)
    hooks.all += [hooks.nan_guard, hooks.backup]
    return hooks


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
    lock = run_dir.claim_model_dir(config.model_dir) if is_chief else None
    try:
        return _run(config, strategy, is_chief, flags_text)
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Trained:
    """What the attempts left: the last attempt's config (its seed), model and
    callbacks, the failed attempts' records and the kept training time."""

    config: object
    model: object
    hooks: RunCallbacks
    attempts: list
    train_seconds: float


@dataclasses.dataclass
class _Selection:
    """Which weights are evaluated and exported, and why."""

    text: str = "last"
    warnings: list = dataclasses.field(default_factory=list)
    least_bad: dict = None
    metrics_dir: str = None  # whose metrics.jsonl the NOT ROBUST check reads
    seed: int = None


def _run(config, strategy, is_chief, flags_text):
    started = time.time()
    run_dir.prepare_model_dir(config, is_chief)
    info, train, val, test = load_data(config)  # fails fast on bad data
    steps = steps_per_epoch(len(train[1]), config.batch_size)
    strategy = _set_up(config, strategy, is_chief)
    trained = _train_attempts(config, strategy, info, steps, (train, val, test), is_chief,
                              flags_text)
    selection = _select_weights(trained, val)
    classifier = builders.export_classifier(config, info, trained.model.base_model)
    results = _final_evaluation(trained, selection, classifier, test, is_chief)
    results["wall_seconds_this_process"] = time.time() - started
    if is_chief:
        _write_results(trained, classifier, results)
    return results


def _set_up(config, strategy, is_chief):
    """The strategy (checked against the batch size) and the dtype policy."""
    import keras

    from tf_backsmooth import distribute, fastgrad

    if strategy is None:
        strategy = distribute.get_strategy(config.strategy, config.num_cpu_devices)
    distribute.check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    keras.config.set_dtype_policy(config.dtype_policy)
    note = cpu.bfloat16_warning(config.dtype_policy, cpu.bfloat16_units(cpu.cpu_flags()),
                            fastgrad.accelerator())
    if note and is_chief:
        log.warning("%s", note)
    return strategy


def _build_attempt(config, strategy, info, steps, train, is_chief):
    """A compiled model for one attempt, with XLA decided (possibly timed on
    one batch: done here, so the manifest and the log record the mode used;
    nothing is timed under a strategy)."""
    with strategy.scope():
        model = builders.build_model(config, info, steps)
        model.compile(optimizer=builders.make_optimizer(config, steps),
                      jit_compile=config.jit_compile)
        model.build((None,) + tuple(info.input_shape))
    per_replica = config.batch_size // strategy.num_replicas_in_sync
    model.measure_xla(data_lib.to_float(train[0][:per_replica]), train[1][:per_replica],
                      batch_size=per_replica)
    return model


def _write_run_files(base_config, config, model, strategy, flags_text):
    if flags_text is not None:
        fileio.write_text(os.path.join(config.model_dir, "flags.txt"), flags_text)
    fileio.write_json(os.path.join(config.model_dir, run_dir.CONFIG),
                      run_dir.config_payload(base_config))
    fileio.write_json(os.path.join(config.model_dir, run_dir.MANIFEST),
                      run_dir.manifest(config, model, config.strategy,
                               strategy.num_replicas_in_sync))


def _train_attempts(base_config, strategy, info, steps, data, is_chief, flags_text):
    """Trains attempt after attempt until one passes the failure check or no
    restart is left; attempt k > 0 (after k failed ones) has its own seed."""
    from tf_backsmooth import callbacks as cb

    train, val, test = data
    attempts = run_dir.read_attempts(base_config.model_dir)
    while True:
        config = dataclasses.replace(
            base_config, seed=run_dir.attempt_seed(base_config.seed, len(attempts)))
        model = _build_attempt(config, strategy, info, steps, train, is_chief)
        if is_chief:
            _write_run_files(base_config, config, model, strategy, flags_text)
        hooks = make_callbacks(config, model, val, config.batch_size, is_chief, train=train,
                               test=test)
        try:
            first_epoch = hooks.backup.restore(model)  # verified, with fallback
        except cb.CheckpointError as err:
            raise run_dir.RunError(str(err)) from None
        hooks.run_log.resume(first_epoch)
        log.info("training %s/%s on %s: %d steps/epoch, %d replica(s), XLA %s (%s), starting "
                 "at epoch %d%s", config.method, config.model, config.dataset, steps,
                 strategy.num_replicas_in_sync, "on" if model.xla else "off",
                 model.xla_reason, first_epoch,
                 f" (attempt {len(attempts) + 1}, seed {config.seed})" if attempts else "")
        detector = hooks.detector
        if detector is not None:
            detector.stop_on_failure = len(attempts) < config.failure_restarts
        train_start = time.time()
        # With every epoch done (killed after training) fit runs no epoch but
        # still lets the callbacks read their state back.
        model.fit(train_batches(config, first_epoch), epochs=config.epochs,
                  steps_per_epoch=steps, initial_epoch=first_epoch, callbacks=hooks.all,
                  shuffle=False, verbose=config.verbose if is_chief else 0)
        train_seconds = run_dir.total_epoch_seconds(config.model_dir)
        if train_seconds is None:
            train_seconds = time.time() - train_start
        if detector is None or detector.failed is None or not detector.stop_on_failure:
            return _Trained(config, model, hooks, attempts, train_seconds)
        _record_failed_attempt(base_config, config, hooks, attempts, train_seconds, is_chief)
        del model, hooks


def _record_failed_attempt(base_config, config, hooks, attempts, train_seconds, is_chief):
    """Logs the failure, records the attempt and archives its files."""
    failed = hooks.detector.failed
    rollback = run_dir.rollback_epoch(config, failed["epoch"], config.model_dir)
    wasted_seconds, wasted_evals = run_dir.discarded_cost(
        config.model_dir, rollback, train_seconds, hooks.grad_evals())
    attempts.append(dict(failed, seed=config.seed, train_seconds=wasted_seconds,
                         grad_evals=wasted_evals, rollback_epoch=rollback))
    log.warning("FAILED attempt %d (seed %d) at epoch %d: %s; restarting with seed %d from "
                "%s (%d restart(s) left)", len(attempts), config.seed, failed["epoch"],
                health.describe_failure(failed),
                run_dir.attempt_seed(base_config.seed, len(attempts)),
                f"the checkpoint of epoch {rollback}" if rollback else "scratch",
                base_config.failure_restarts - len(attempts))
    if is_chief:
        run_dir.archive_attempt(config.model_dir, len(attempts), attempts, rollback)


def _select_weights(trained, val):
    """The weights to evaluate and export: after a NaN the best or last good
    epoch's, else the best epoch's by validation, and when every attempt
    failed the check the least bad attempt's."""
    config, model, hooks = trained.config, trained.model, trained.hooks
    chosen = _Selection(metrics_dir=config.model_dir, seed=config.seed)
    best = hooks.best
    if hooks.nan_guard.hit:
        nan_step = int(model.optimizer.iterations.numpy())
        if best is not None and best.restore_best(model.base_model):
            chosen.text = f"best (epoch {best.best_epoch}, after NaN)"
        else:
            good_epoch = hooks.backup.restore(model)
            if good_epoch == 0:
                raise run_dir.RunError(
                    f"the loss became NaN/inf at step {nan_step}, before any epoch "
                    "completed: nothing to keep, nothing exported. Lower --lr (or check "
                    "the data) and start again in another --model_dir (or delete this one)")
            chosen.text = f"last good epoch {good_epoch} (after NaN)"
        chosen.warnings.append(
            f"the loss became NaN/inf at step {nan_step}: training stopped; the "
            f"evaluated and exported weights are the {chosen.text} ones")
        log.warning("NaN: %s", chosen.warnings[-1])
    elif best is not None and best.restore_best(model.base_model):
        chosen.text = f"best (epoch {best.best_epoch}, {best.monitor}={best.best:.4f})"
    detector = hooks.detector
    if (trained.attempts and detector is not None and detector.failed is not None
            and config.failure_keep == "best" and not hooks.nan_guard.hit):
        kept = health.choose_least_bad(config, model, detector, trained.attempts, val,
                                       chosen.text)
        chosen.least_bad, chosen.text = kept["least_bad"], kept["text"]
        if kept["metrics_dir"] is not None:  # an earlier attempt's weights
            chosen.metrics_dir, chosen.seed = kept["metrics_dir"], kept["seed"]
        chosen.warnings.append(kept["warning"])
    return chosen


def _final_evaluation(trained, chosen, classifier, test, is_chief):
    """Clean and PGD accuracy of the exported classifier on the test split,
    the NOT ROBUST check and, when asked, autoattack_lite (OVERESTIMATED)."""
    from tf_backsmooth import evaluation

    config, model, hooks, attempts = (trained.config, trained.model, trained.hooks,
                                      trained.attempts)
    x_test = data_lib.to_float(test[0])
    progress = is_chief and config.verbose > 0
    log.info("final test evaluation: clean and PGD-%d on %d test images",
             config.test_pgd_steps, len(test[1]))
    report = evaluation.evaluate(classifier, x_test, test[1], [config.epsilon],
                                 attacks=("pgd",), pgd_steps=config.test_pgd_steps,
                                 seed=config.seed, progress=progress,
                                 per_example=bool(config.test_autoattack_examples))
    results = {
        "clean_accuracy": float(report["clean_accuracy"]),
        "robust_accuracy": float(report["robust_accuracy"]),
        "robust_attack": f"PGD-{config.test_pgd_steps} (CE, random start, "
                         f"step 2.5*eps/{config.test_pgd_steps})",
        "epsilon": config.epsilon,
        "test_examples": int(len(test[1])),
        "selected_weights": chosen.text,
        "epochs": config.epochs,
        "train_seconds": trained.train_seconds + sum(a["train_seconds"] for a in attempts),
        "wall_seconds_this_process": None,
        "grad_evals": hooks.grad_evals() + sum(a["grad_evals"] for a in attempts),
        "seed": chosen.seed,
        "failed_attempts": attempts,
        "least_bad": chosen.least_bad,
        "grad_evals_per_example_per_step": model.method.grad_evals(model.params),
        "steps": int(model.optimizer.iterations.numpy()),
        "nan_stop": hooks.nan_guard.hit,
        "xla": model.xla,
        "weights_sha256": fileio.weights_fingerprint(classifier),
        "co_guard": hooks.guard.summary() if hooks.guard is not None else None,
        "warnings": chosen.warnings + report.get("warnings", []),
    }
    gap_warning = health.robustness_gap_warning(chosen.metrics_dir, results["robust_accuracy"])
    if gap_warning is not None:
        results["warnings"].append(gap_warning)
        if is_chief:
            log.warning("NOT ROBUST: %s", gap_warning)
    if config.test_autoattack_examples:
        strong, strong_warning = health.final_autoattack(
            classifier, x_test, test[1], config.epsilon, health.pgd_verdicts(report),
            examples=config.test_autoattack_examples, pgd_steps=config.test_pgd_steps,
            seed=config.seed, progress=progress)
        results["autoattack_lite"] = strong
        results["warnings"] += [w for w in strong["evaluation_warnings"]
                                if w not in results["warnings"]]
        if strong_warning is not None:
            results["warnings"].append(strong_warning)
            if is_chief:
                log.warning("OVERESTIMATED: %s", strong_warning)
    return results


def _write_results(trained, classifier, results):
    """The run's last writes; only then is it finished (until here a kill
    resumes from the backup into the final evaluation; after a NaN the backup
    is kept)."""
    model_dir = trained.config.model_dir
    path = os.path.join(model_dir, run_dir.MANIFEST)
    payload = fileio.read_json(path)
    if results["co_guard"] is not None:  # the manifest records its events
        payload["co_guard"] = results["co_guard"]
        fileio.write_json(path, payload)
    results["model_card"] = run_dir.model_card(trained.config, results, payload)
    fileio.save_model(classifier, os.path.join(model_dir, "model.keras"))
    fileio.write_json(os.path.join(model_dir, run_dir.RESULTS), results)
    if not results["nan_stop"]:
        shutil.rmtree(os.path.join(model_dir, run_dir.BACKUP), ignore_errors=True)

# Names that lived here before 0.2.0: reading one says where it is now.
MOVED = {
    **{name: f"tf_backsmooth.run_dir.{name}" for name in (
        "RunError", "RESULTS", "CONFIG", "MANIFEST", "BACKUP", "claim_model_dir",
        "prepare_model_dir", "attempt_seed", "manifest")},
    **{name: f"tf_backsmooth.health.{name}" for name in (
        "robustness_gap_warning", "overestimate_warning", "final_autoattack", "pgd_verdicts",
        "make_failure_detector", "make_co_guard", "describe_failure", "check_score",
        "keep_least_bad")},
    **{name: f"tf_backsmooth.builders.{name}" for name in (
        "make_optimizer", "make_classifier", "build_model", "export_classifier")},
    "make_schedule": "tf_backsmooth.schedules.learning_rate",
    "CyclicSchedule": "tf_backsmooth.schedules.CyclicSchedule",
    "bfloat16_warning": "tf_backsmooth.cpu.bfloat16_warning",
    "cpu_bfloat16_units": "tf_backsmooth.cpu.bfloat16_units(tf_backsmooth.cpu.cpu_flags())",
    "weights_fingerprint": "tf_backsmooth.fileio.weights_fingerprint",
}
__getattr__ = moved.getattr_for(__name__, MOVED)
