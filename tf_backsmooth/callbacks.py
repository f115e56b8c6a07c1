"""Keras callbacks of a training run: robust validation, best-checkpoint
selection, throughput/cost logging, image summaries, NaN handling.

Order matters: :class:`RobustValidation` writes ``val_robust_accuracy`` into
the epoch logs, which the callbacks after it (best checkpoint, run log,
TensorBoard, backup) read. ``train_lib.make_callbacks`` builds them in order.

Only the chief (``is_chief=True``) writes files; every worker computes the
same values so that all replicas take the same decisions.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import time
import zipfile

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import attacks, fileio

log = logging.getLogger("tf_backsmooth")


def _finite_loss(logs):
    """False for the epoch logs of an epoch that ended in a NaN/inf loss."""
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


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
        if logs is None or not self._due(epoch) or not _finite_loss(logs):
            return
        from tf_backsmooth import evaluation
        base = self.model.base_model
        report = evaluation.evaluate(
            base, self.x, self.y, [self.epsilon], attacks=("pgd",),
            batch_size=self.batch_size, pgd_steps=self.steps, seed=self.seed)
        logs["val_clean_accuracy"] = float(report["clean_accuracy"])
        logs["val_robust_accuracy"] = float(report["robust_accuracy"])


class ComputeCurve(keras.callbacks.Callback):
    """Robustness against compute: every ``every`` epochs (and after the last,
    ``total_epochs``) autoattack_lite (APGD-CE, then APGD-T on what it left)
    and PGD-20 on fixed test images (``x``, ``y``), at the full ``epsilon``,
    logged as ``curve_clean_accuracy``, ``curve_pgd_accuracy`` and
    ``curve_autoattack_lite_accuracy`` beside that epoch's cumulative
    ``grad_evals`` and ``epoch_seconds`` (:class:`RunLog` must come after it:
    it writes them, and leaves this callback's own ``curve_seconds`` out of
    ``epoch_seconds``, so the training time on the curve's axis is training
    only). Seeded: every epoch's evaluation draws the same random starts."""

    def __init__(self, x, y, epsilon, every, total_epochs, seed=0, batch_size=500):
        super().__init__()
        self.x, self.y = x, y
        self.epsilon, self.every, self.total_epochs = epsilon, int(every), total_epochs
        self.seed, self.batch_size = seed, batch_size

    def due(self, epoch):
        """Whether 0-based ``epoch`` ends with a curve point."""
        return self.every > 0 and ((epoch + 1) % self.every == 0
                                   or epoch + 1 == self.total_epochs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self.due(epoch) or not _finite_loss(logs):
            return
        from tf_backsmooth import evaluation
        start = time.perf_counter()
        report = evaluation.evaluate(
            self.model.base_model, self.x, self.y, [self.epsilon],
            attacks=("pgd", "autoattack_lite"), batch_size=self.batch_size,
            pgd_steps=20, seed=self.seed)
        accuracies = next(iter(report["attacks"].values()))
        logs["curve_clean_accuracy"] = float(report["clean_accuracy"])
        logs["curve_pgd_accuracy"] = float(accuracies["pgd"])
        logs["curve_autoattack_lite_accuracy"] = float(accuracies["autoattack_lite"])
        logs["curve_seconds"] = time.perf_counter() - start
        log.info("curve at epoch %d: autoattack_lite %.4f, PGD-20 %.4f, clean %.4f on %d "
                 "test images (%.1f s)", epoch + 1, logs["curve_autoattack_lite_accuracy"],
                 logs["curve_pgd_accuracy"], logs["curve_clean_accuracy"], len(self.y),
                 logs["curve_seconds"])


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
        self._sha256 = None

    def restore_best(self, base_model):
        """Loads the selected weights into ``base_model``; False if none.

        The file chosen before a resume is loaded only if its sha256 matches
        the one recorded in ``best.json`` when it was written."""
        if self.best_weights is not None:
            base_model.set_weights(self.best_weights)
            return True
        if self.best_epoch is None or not os.path.exists(self.weights_path):
            return False  # without best.json the file was never selected
        if (self._sha256 is not None  # (absent from older runs)
                and fileio.sha256_file(self.weights_path) != self._sha256):
            log.warning("%s does not match the checksum in %s (damaged); "
                        "using the last weights instead", self.weights_path,
                        self.info_path)
            return False
        base_model.load_weights(self.weights_path)
        return True

    def read(self):
        """Reads back the selection recorded in ``best.json`` (a resumed run,
        or another attempt's folder); nothing when there is none."""
        self._sha256 = None
        if os.path.exists(self.info_path) and os.path.exists(self.weights_path):
            info = fileio.read_json(self.info_path)
            self.best, self.best_epoch = info["value"], info["epoch"]
            self._sha256 = info.get("sha256")
        return self

    def on_train_begin(self, logs=None):
        self.read()

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if (value is None or not math.isfinite(value) or value <= self.best
                or not _finite_loss(logs)):
            return
        self.best, self.best_epoch = float(value), epoch + 1
        self.best_weights = [w.copy() for w in self.model.base_model.get_weights()]
        if self.is_chief:
            self._sha256 = fileio.save_weights(self.model.base_model,
                                               self.weights_path)
            fileio.write_json(self.info_path, {
                "monitor": self.monitor, "value": self.best,
                "epoch": self.best_epoch, "sha256": self._sha256})


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

    ``warmup_gap`` (default None, or 1: never) also judges the epoch in which
    the warm-up ends (it starts below and ends at the full epsilon), with its
    own, looser threshold: a healthy model still lags behind there, but a
    failing one is already further behind (docs/MNIST_STUDY.md section 12),
    and judging it saves an epoch per failed attempt.

    ``x``, ``y`` (``--failure_data=train``): the PGD accuracy is measured by
    the detector itself, with PGD-``pgd_steps`` on these (training) images,
    at each epoch it judges, and logged as ``failure_robust_accuracy``; a
    recipe without a validation split can then restart too. Measuring does
    not touch the model's weights or the training randomness.

    ``from_epoch`` > 0 judges only epochs ``from_epoch`` (1-based) and later:
    ``from_epoch = epochs`` judges the finished run only, for a recipe whose
    healthy runs can dip below PGD and recover mid-training (docs/MNIST_STUDY.md
    section 13: Wong et al.'s FGSM-RS).

    ``overestimate_gap`` (with ``x``, ``y``; default None, or 1: off): each
    judged epoch also runs autoattack_lite on the check's images, and an
    attempt whose PGD accuracy there exceeds its autoattack_lite accuracy by
    more than this fails too (gradient masking that PGD does not see, the
    final check's OVERESTIMATED signal; docs/MNIST_STUDY.md section 19). It is
    logged as ``failure_autoattack_accuracy``, and :meth:`robust_accuracy`
    (what attempts are compared by) becomes the worst case of both attacks.

    ``record_path``: on the last attempt allowed (``stop_on_failure`` False)
    a failure is also written there (chief only) and read back at the start
    of training, so a run killed after it and resumed still knows that its
    last attempt failed (``train_lib`` then keeps the least bad attempt).
    """

    def __init__(self, epsilon, gap, warmup_gap=None, from_epoch=0, x=None,
                 y=None, pgd_steps=10, seed=0, batch_size=500, record_path=None,
                 is_chief=True, overestimate_gap=None):
        super().__init__()
        self.epsilon, self.gap = float(epsilon), float(gap)
        self.warmup_gap = (None if warmup_gap is None or warmup_gap >= 1
                           else float(warmup_gap))
        self.overestimate_gap = (None if overestimate_gap is None or overestimate_gap >= 1
                                 else float(overestimate_gap))
        if self.overestimate_gap is not None and x is None:
            raise ValueError("overestimate_gap needs the check's own images (x, y)")
        self.from_epoch = int(from_epoch)
        self.x, self.y = x, y
        self.pgd_steps, self.seed, self.batch_size = pgd_steps, seed, batch_size
        self.failed = None
        self._measured = {}  # digest of the weights -> measure()'s result
        # False on the last attempt allowed: record the failure, keep training.
        self.stop_on_failure = True
        self._full_epsilon = True
        self.record_path, self.is_chief = record_path, is_chief

    def on_train_begin(self, logs=None):
        if (self.failed is None and not self.stop_on_failure
                and self.record_path and os.path.exists(self.record_path)):
            self.failed = fileio.read_json(self.record_path)

    def _warming_up(self):
        warming_up = getattr(self.model, "warming_up", None)
        return warming_up is not None and bool(warming_up())

    def on_epoch_begin(self, epoch, logs=None):
        # Right after a warm-up a healthy model still lags behind (a gap of
        # 0.21 after a 1-epoch warm-up in docs/MNIST_STUDY.md): epochs that
        # start at the full epsilon are judged with ``gap``, the epoch that
        # ends the warm-up only with ``warmup_gap``.
        self._full_epsilon = not self._warming_up()

    def measure(self, model=None):
        """``model`` (default: the trained model's classifier) on the
        check's own images ``x``, ``y``: ``{"pgd": PGD-pgd_steps accuracy,
        "robust": the worst case of the attacks run}``, plus
        ``"autoattack_lite"`` with ``overestimate_gap``.

        The attacks' draws are fixed by ``seed``, so the same weights give the
        same numbers: each measurement is kept under a digest of the weights
        and returned again for them (``health.keep_least_bad`` scores the
        last attempt's final weights, which its judged epoch has already
        measured, after the other attempts'; one small dict per detector)."""
        from tf_backsmooth import evaluation
        model = self.model.base_model if model is None else model
        digest = fileio.weights_fingerprint(model)
        if digest in self._measured:
            return dict(self._measured[digest])
        attacks = ("pgd",) if self.overestimate_gap is None else ("pgd", "autoattack_lite")
        report = evaluation.evaluate(
            model, self.x, self.y, [self.epsilon], attacks=attacks,
            batch_size=self.batch_size, pgd_steps=self.pgd_steps, seed=self.seed)
        acc = next(iter(report["attacks"].values()))
        out = {"pgd": float(acc["pgd"]), "robust": float(report["robust_accuracy"])}
        if self.overestimate_gap is not None:
            out["autoattack_lite"] = float(acc["autoattack_lite"])
        self._measured[digest] = dict(out)
        return out

    def robust_accuracy(self, model=None):
        """What ``train_lib`` compares attempts by: the worst case of the
        check's attacks (PGD-``pgd_steps``, and autoattack_lite with
        ``overestimate_gap``) on its own images."""
        return self.measure(model)["robust"]

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        adv = logs.get("adv_accuracy")
        if (adv is None or self.failed is not None or not _finite_loss(logs)
                or epoch + 1 < self.from_epoch):
            return
        if self._full_epsilon:
            gap, end_of_warmup = self.gap, False
        elif self.warmup_gap is not None and not self._warming_up():
            gap, end_of_warmup = self.warmup_gap, True
        else:
            return
        if self.x is None:
            key, robust = "val_robust_accuracy", logs.get("val_robust_accuracy")
            if robust is None:  # no validation this epoch
                return
        else:
            measured = self.measure()
            key, robust = "train_robust_accuracy", measured["pgd"]
            logs["failure_robust_accuracy"] = robust
        lite = None
        if self.overestimate_gap is not None:  # implies the check's own images
            lite = measured["autoattack_lite"]
            logs["failure_autoattack_accuracy"] = lite
        masked = lite is not None and float(robust) - lite > self.overestimate_gap
        if float(adv) - float(robust) > gap or masked:
            self.failed = {"epoch": epoch + 1, "adv_accuracy": float(adv),
                           key: float(robust), "end_of_warmup": end_of_warmup}
            if lite is not None:
                self.failed.update(train_autoattack_accuracy=lite, overestimated=masked)
            self.model.stop_training = self.stop_on_failure
            if not self.stop_on_failure and self.record_path and self.is_chief:
                fileio.write_json(self.record_path, self.failed)


class RunLog(keras.callbacks.Callback):
    """Adds ``learning_rate``, ``examples_per_second`` and cumulative
    ``grad_evals`` (forward+backward passes, summed over training examples)
    to the epoch logs, and writes every epoch's logs to ``metrics.jsonl``.

    Work is counted per executed batch at the method's current cost, so it
    stays right when the catastrophic-overfitting guard rolls the optimizer
    step back or switches method. A resumed run (:meth:`resume`, called by
    ``train_lib`` or at the first epoch) continues the count and drops the
    records of epochs after its checkpoint (they are trained again), so the
    file never holds an epoch twice; it is rewritten atomically each epoch.
    """

    def __init__(self, model_dir, global_batch_size, is_chief=True):
        super().__init__()
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self.global_batch_size = global_batch_size
        self.is_chief = is_chief
        self.grad_evals = 0.0
        self._records = None
        self._start = None
        self._batches = 0

    def resume(self, epoch):
        """Continues after ``epoch`` completed epochs (0: a new run)."""
        self._records = {r["epoch"]: r for r in fileio.read_jsonl(self.path)
                         if r["epoch"] <= epoch}
        self.grad_evals = float(self._records.get(epoch, {}).get(
            "grad_evals", 0.0))

    def on_epoch_begin(self, epoch, logs=None):
        if self._records is None:
            self.resume(epoch)
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
        # Training time: the robustness curve's own evaluation is left out.
        seconds = time.perf_counter() - self._start - logs.get("curve_seconds", 0.0)
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            opt.learning_rate))
        logs["examples_per_second"] = (self._batches * self.global_batch_size
                                       / max(seconds, 1e-9))
        logs["epoch_seconds"] = seconds
        logs["grad_evals"] = self.grad_evals
        record = {"epoch": epoch + 1, "step": int(opt.iterations.numpy())}
        record.update({k: float(v) for k, v in logs.items()})
        self._records[epoch + 1] = record
        if self.is_chief:
            fileio.write_jsonl(self.path, [self._records[e]
                                           for e in sorted(self._records)])


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
            # Keras' TensorBoard callback logs epoch scalars at step `epoch`.
            tf.summary.image("clean_adversarial_perturbation", grid,
                             step=epoch)
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


class CheckpointError(RuntimeError):
    """No checkpoint of an interrupted run can be loaded."""


def training_state(model):
    """Every variable a resumed run needs, in a fixed order: the model's
    (weights, BatchNorm statistics, Dropout RNG states -- which
    ``save_weights`` leaves out) and the optimizer's (step count, moments)."""
    state = list(model.variables)
    seen = {id(v) for v in state}
    if model.optimizer is not None:
        state += [v for v in model.optimizer.variables if id(v) not in seen]
    return state


class Backup(keras.callbacks.Callback):
    """Per-epoch checkpoints of the whole training state, verified on resume.

    At each epoch end (chief only, not after a NaN) it writes
    ``epoch-<N>.npz`` (:func:`training_state`, so a resumed run continues
    exactly, Dropout masks included) and then ``training_metadata.json``
    naming the newest ``keep`` checkpoints with their sha256; older
    checkpoints are deleted. Every write is atomic (:mod:`fileio`), so a kill
    or a full disk at any instant leaves the previous checkpoint intact.

    :meth:`restore` (called by ``train_lib`` before ``fit``) tries them
    newest first -- checksum, archive CRCs, variable count and shapes -- logs
    which one it used and why it skipped others, and raises
    :class:`CheckpointError` naming the files when none is usable. The files
    are kept after training (``train_lib`` deletes the folder once
    ``results.json`` is written), so a kill during the final evaluation
    resumes into it.
    """

    METADATA = "training_metadata.json"
    _NAME = re.compile(r"^epoch-(\d+)\.npz$")

    def __init__(self, backup_dir, nan_guard=None, is_chief=True, keep=2):
        super().__init__()
        self.backup_dir = backup_dir
        self.nan_guard = nan_guard
        self.is_chief = is_chief
        self.keep = keep
        self._entries = []

    def _metadata_path(self):
        return os.path.join(self.backup_dir, self.METADATA)

    def _candidates(self):
        """Checkpoint entries newest first: those recorded in the metadata
        (with checksums), then files the metadata does not list (when it is
        damaged or a kill came between the two writes)."""
        if not os.path.isdir(self.backup_dir):
            return []
        entries = []
        try:
            entries = list(fileio.read_json(self._metadata_path())["checkpoints"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            if os.path.exists(self._metadata_path()):
                log.warning("backup: %s is unreadable (%s); checking the "
                            "checkpoint files themselves",
                            self._metadata_path(), err)
        listed = {e["file"] for e in entries}
        for name in os.listdir(self.backup_dir):
            match = self._NAME.match(name)
            if match and name not in listed:
                entries.append({"epoch": int(match.group(1)), "file": name,
                                "sha256": None})
        return sorted(entries, key=lambda e: -e["epoch"])

    def _read(self, entry, variables):
        path = os.path.join(self.backup_dir, entry["file"])
        with open(path, "rb") as f:
            data = f.read()
        if entry.get("sha256") is not None:
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"sha256 differs from the one recorded at "
                                 f"write time ({len(data)} bytes: truncated "
                                 "or overwritten)")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        if len(arrays) != len(variables):
            raise ValueError(f"holds {len(arrays)} variables, the model has "
                             f"{len(variables)}")
        for var, value in zip(variables, arrays):
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"variable {var.path} has shape {value.shape}"
                                 f", the model's is {tuple(var.shape)}")
        return arrays

    def restore(self, model):
        """Loads the newest usable checkpoint into ``model`` (built, with
        its optimizer built); returns its epoch, 0 when there is none."""
        variables = training_state(model)
        problems = []
        for entry in self._candidates():
            try:
                arrays = self._read(entry, variables)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile,
                    EOFError) as err:
                problems.append(f"{entry['file']}: {err}")
                log.warning("backup: cannot use %s (%s); trying the previous "
                            "checkpoint", entry["file"], err)
                continue
            for var, value in zip(variables, arrays):
                var.assign(value)
            self._entries = [e for e in self._candidates()
                             if e["epoch"] <= entry["epoch"]][:self.keep]
            log.info("backup: resumed from %s (after epoch %d)%s",
                     os.path.join(self.backup_dir, entry["file"]),
                     entry["epoch"],
                     f", skipping {len(problems)} damaged checkpoint(s)"
                     if problems else "")
            return int(entry["epoch"])
        if problems:
            raise CheckpointError(
                f"no usable checkpoint in {self.backup_dir} ("
                + "; ".join(problems) + "): delete that folder to train this "
                "run again from epoch 0, or put back an intact copy")
        return 0

    def save(self, epoch):
        """Writes the checkpoint after ``epoch`` completed epochs."""
        os.makedirs(self.backup_dir, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, *[keras.ops.convert_to_numpy(v)
                        for v in training_state(self.model)])
        name = f"epoch-{epoch}.npz"
        sha = fileio.write_bytes(os.path.join(self.backup_dir, name),
                                 buf.getvalue())
        self._entries = ([{"epoch": epoch, "file": name, "sha256": sha}]
                         + [e for e in self._entries
                            if e["epoch"] < epoch])[:self.keep]
        fileio.write_json(self._metadata_path(),
                          {"epoch": epoch, "checkpoints": self._entries})
        kept = {e["file"] for e in self._entries}
        for old in os.listdir(self.backup_dir):
            if self._NAME.match(old) and old not in kept:
                os.remove(os.path.join(self.backup_dir, old))

    def on_epoch_end(self, epoch, logs=None):
        # Only the chief writes; every worker restores from the same files
        # (all replicas hold identical weights).
        nan = self.nan_guard is not None and self.nan_guard.hit
        if self.is_chief and not nan and _finite_loss(logs):
            self.save(epoch + 1)
