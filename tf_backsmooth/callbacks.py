"""Keras callbacks of a training run: robust validation, best-checkpoint
selection, throughput/cost logging, image summaries, NaN handling.

Order matters: :class:`RobustValidation` writes ``val_robust_accuracy`` into
the epoch logs, which the callbacks after it (best checkpoint, run log,
TensorBoard, backup) read. ``train_lib.make_callbacks`` builds them in order.

Only the chief (``is_chief=True``) writes files; every worker computes the
same values so that all replicas take the same decisions.
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import attacks


def _atomic_write_json(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class RobustValidation(keras.callbacks.Callback):
    """Clean and PGD-k accuracy of the base classifier on a fixed validation
    subset every ``every`` epochs (and after the last epoch), logged as
    ``val_clean_accuracy`` / ``val_robust_accuracy``."""

    def __init__(self, x, y, epsilon, steps=10, every=1, batch_size=500,
                 seed=0, total_epochs=None):
        super().__init__()
        self.x, self.y = x, y
        self.epsilon, self.steps, self.every = epsilon, steps, every
        self.batch_size, self.seed = batch_size, seed
        self.total_epochs = total_epochs

    def _due(self, epoch):
        last = self.total_epochs is not None and epoch + 1 == self.total_epochs
        return self.every > 0 and ((epoch + 1) % self.every == 0 or last)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._due(epoch):
            return
        from tf_backsmooth import evaluation
        base = self.model.base_model
        report = evaluation.evaluate(
            base, self.x, self.y, [self.epsilon], attacks=("pgd",),
            batch_size=self.batch_size, pgd_steps=self.steps, seed=self.seed)
        logs["val_clean_accuracy"] = float(report["clean_accuracy"])
        logs["val_robust_accuracy"] = float(report["robust_accuracy"])


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the base classifier's weights with the best ``monitor`` value.

    Saves ``best.weights.h5`` and ``best.json`` (value, epoch) in ``model_dir``;
    on a resumed run the best value so far is read back from ``best.json``.
    Every worker also keeps the best weights in memory (``best_weights``):
    all workers see the same validation numbers, so they select the same
    epoch without reading a file that the chief may be writing.
    """

    def __init__(self, model_dir, monitor="val_robust_accuracy",
                 is_chief=True):
        super().__init__()
        self.monitor = monitor
        self.is_chief = is_chief
        self.weights_path = os.path.join(model_dir, "best.weights.h5")
        self.info_path = os.path.join(model_dir, "best.json")
        self.best = -math.inf
        self.best_epoch = None
        self.best_weights = None

    def restore_best(self, base_model):
        """Loads the selected weights into ``base_model``; False if none."""
        if self.best_weights is not None:
            base_model.set_weights(self.best_weights)
            return True
        if os.path.exists(self.weights_path):  # chosen before a resume
            base_model.load_weights(self.weights_path)
            return True
        return False

    def on_train_begin(self, logs=None):
        if os.path.exists(self.info_path) and os.path.exists(self.weights_path):
            with open(self.info_path) as f:
                info = json.load(f)
            self.best, self.best_epoch = info["value"], info["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(value) or value <= self.best:
            return
        self.best, self.best_epoch = float(value), epoch + 1
        self.best_weights = [w.copy() for w in self.model.base_model.get_weights()]
        if self.is_chief:
            self.model.base_model.save_weights(self.weights_path)
            _atomic_write_json(self.info_path, {
                "monitor": self.monitor, "value": self.best,
                "epoch": self.best_epoch})


class FailureDetector(keras.callbacks.Callback):
    """Stops a run that beats its own training attack but not PGD.

    At the end of an epoch trained entirely at the full epsilon (with a
    warm-up, the first epoch that starts after it), a training-attack accuracy
    (``adv_accuracy``) more than ``gap`` above the validation PGD accuracy
    (``val_robust_accuracy``) is the signature of catastrophic overfitting or
    gradient masking (docs/MNIST_STUDY.md: every failed run showed a gap of
    0.28 or more, every healthy one 0.10 or less). It sets ``failed`` and
    stops training; ``train_lib`` then restarts with another seed (see
    ``--failure_restarts``). Needs :class:`RobustValidation` before it.
    """

    def __init__(self, epsilon, gap):
        super().__init__()
        self.epsilon, self.gap = float(epsilon), float(gap)
        self.failed = None
        # False on the last attempt allowed: record the failure, keep training.
        self.stop_on_failure = True
        self._full_epsilon = True

    def on_epoch_begin(self, epoch, logs=None):
        # Right after a warm-up a healthy model still lags behind (a gap of
        # 0.21 after a 1-epoch warm-up in docs/MNIST_STUDY.md): only epochs
        # that start at the full epsilon are judged.
        warming_up = getattr(self.model, "warming_up", None)
        self._full_epsilon = warming_up is None or not warming_up()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        val, adv = logs.get("val_robust_accuracy"), logs.get("adv_accuracy")
        if val is None or adv is None or not self._full_epsilon:
            return
        if self.failed is None and float(adv) - float(val) > self.gap:
            self.failed = {"epoch": epoch + 1, "adv_accuracy": float(adv),
                           "val_robust_accuracy": float(val)}
            self.model.stop_training = self.stop_on_failure


class RunLog(keras.callbacks.Callback):
    """Adds ``learning_rate``, ``examples_per_second`` and cumulative
    ``grad_evals`` (forward+backward passes, summed over training examples)
    to the epoch logs, and appends every epoch's logs to ``metrics.jsonl``.

    Work is counted per executed batch at the method's current cost, so it
    stays right when the catastrophic-overfitting guard rolls the optimizer
    step back or switches method; a resumed run continues the count from the
    last line of ``metrics.jsonl``.
    """

    def __init__(self, model_dir, global_batch_size, is_chief=True):
        super().__init__()
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self.global_batch_size = global_batch_size
        self.is_chief = is_chief
        self.grad_evals = 0.0
        self._start = None
        self._batches = 0

    def on_train_begin(self, logs=None):
        self._previous = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    record = json.loads(line)
                    self._previous[record["epoch"]] = record
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first:  # resuming after `epoch` completed epochs
            record = self._previous.get(epoch, {})
            self.grad_evals = float(record.get("grad_evals", 0.0))
            self._first = False
        self._start = time.perf_counter()
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        model = self.model
        self.grad_evals += (self.global_batch_size
                            * model.method.grad_evals(model.params))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = self.model.optimizer
        seconds = time.perf_counter() - self._start
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            opt.learning_rate))
        logs["examples_per_second"] = (self._batches * self.global_batch_size
                                       / max(seconds, 1e-9))
        logs["epoch_seconds"] = seconds
        logs["grad_evals"] = self.grad_evals
        if self.is_chief:
            record = {"epoch": epoch + 1,
                      "step": int(opt.iterations.numpy())}
            record.update({k: float(v) for k, v in logs.items()})
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


class AdversarialImages(keras.callbacks.Callback):
    """Writes a TensorBoard image grid: clean inputs (top row), PGD
    adversarial inputs, and perturbations mapped from [-eps, eps] to [0, 1]."""

    def __init__(self, log_dir, x, y, epsilon, steps=10, every=1):
        super().__init__()
        self.x = tf.constant(x[:8])
        self.y = tf.constant(y[:8])
        self.epsilon, self.steps, self.every = epsilon, steps, every
        self.writer = tf.summary.create_file_writer(
            os.path.join(log_dir, "images"))

    def on_epoch_end(self, epoch, logs=None):
        if self.every <= 0 or (epoch + 1) % self.every:
            return
        base = self.model.base_model
        x_adv = attacks.pgd(lambda t: base(t, training=False), self.x, self.y,
                            self.epsilon, 2.5 * self.epsilon / self.steps,
                            self.steps, seed=epoch)
        delta = (x_adv - self.x) / (2.0 * self.epsilon) + 0.5
        rows = [tf.concat(tf.unstack(t), axis=1)
                for t in (self.x, x_adv, delta)]
        grid = tf.clip_by_value(tf.concat(rows, axis=0)[None], 0.0, 1.0)
        with self.writer.as_default():
            tf.summary.image("clean_adversarial_perturbation", grid,
                             step=epoch + 1)
        self.writer.flush()


class NaNGuard(keras.callbacks.TerminateOnNaN):
    """``TerminateOnNaN`` that records the event, so that the run keeps the
    last good backup instead of deleting it and reports the failure."""

    def __init__(self):
        super().__init__()
        self.hit = False

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.hit = True
        super().on_batch_end(batch, logs)


class Backup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` (double-checkpointed, so a kill during a save
    falls back to the previous one) that keeps its files after a NaN stop."""

    def __init__(self, backup_dir, nan_guard, is_chief=True):
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=True,
                         delete_checkpoint=True)
        self.nan_guard = nan_guard
        self.is_chief = is_chief

    def on_epoch_end(self, epoch, logs=None):
        # Only the chief writes; every worker restores from the same files
        # (all replicas hold identical weights).
        if self.is_chief and not self.nan_guard.hit:
            super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self.is_chief and not self.nan_guard.hit:
            super().on_train_end(logs)
