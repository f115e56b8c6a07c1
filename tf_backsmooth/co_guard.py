"""Catastrophic-overfitting guard for single-step robust training.

Single-step methods (``fgsm_rs``, ``fast_trades``, ``n_fgsm``) can collapse
within an epoch ("catastrophic overfitting", Wong et al. 2020): PGD robust
accuracy falls to about 0 while FGSM accuracy climbs, often above the clean
accuracy. :class:`COGuard` is a Keras callback that watches for this during
``model.fit`` and, when it happens, rolls the run back to the last healthy
state and changes the training attack.

What it does
------------
Every ``every_steps`` training steps (and once before the first step) it
measures, on a FIXED batch of training examples and with the base classifier
in inference mode:

* PGD-``pgd_steps`` accuracy (CE, uniform random start with a fixed seed, step
  ``2.5 * eps / pgd_steps``, as :mod:`tf_backsmooth.evaluation`),
* FGSM accuracy (one step of ``eps`` from the clean input, no random start),
* clean accuracy (one forward pass),
* optionally the gradient alignment of Andriushchenko & Flammarion (2020):
  the mean cosine between the input gradients of the CE at ``x`` and at
  ``clip(x + U(-eps, eps))``.

The measurement is one ``tf.function`` (traced once per model) built from
:func:`tf_backsmooth.attacks.pgd` / :func:`~tf_backsmooth.attacks.fgsm`.

The rule (:func:`collapse_detected`)
------------------------------------
Let ``best`` be the highest PGD accuracy among the last ``window`` accepted
(non-collapse) measurements. With the default ``rule="drop_and_gap"`` a
measurement is a COLLAPSE when::

    best - pgd_accuracy > drop          (PGD accuracy fell; default 0.2)
    and fgsm_accuracy - pgd_accuracy > gap   (FGSM no longer finds the
                                               adversarial examples; default 0.2)

``rule="drop"`` or ``rule="gap"`` use one condition alone.
``rule="floor_and_gap"`` fires when ``pgd_accuracy <= floor`` (default 0.05)
and the gap condition holds: for runs that fail before they ever become
robust (MNIST eps 0.3 FGSM-RS with mnist_cnn, see docs/CO_GUARD.md), where
there is no drop to see; use a large ``gap`` (0.5) with it, since a healthy
FGSM-RS run can show FGSM - PGD gaps of 0.5 at moderate PGD accuracy. A callable
``rule(window, measurement) -> bool`` (``window``: list of the accepted
measurement dicts, oldest first) replaces the rule. A non-collapse
measurement is HEALTHY, and becomes the new "last good" snapshot, when its
PGD accuracy is within ``healthy_drop`` (default ``drop / 2``) of ``best``:
a run that is sliding towards a collapse stops refreshing the snapshot.

On a collapse
-------------
1. The model's weights (``model.weights``: trainable and non-trainable, e.g.
   BatchNorm statistics) and the optimizer's variables (``iterations``,
   learning rate, momentum/Adam slots) are restored EXACTLY from the in-memory
   NumPy copies of the last good snapshot (``restore_iterations=False`` keeps
   the optimizer step counter running instead). Values are assigned into the
   existing variables, so the compiled train function stays valid. With
   ``model_dir`` the snapshot is also on disk as
   ``<model_dir>/co_guard/last_good.weights.h5`` (``model.load_weights``
   reads it back, optimizer included).
2. The mitigation policy runs: ``"shrink_step"`` multiplies the method's step
   size by ``factor`` (``model.set_params(step_size=...)``);
   ``"switch_method"`` switches to ``fallback`` (default
   ``backward_smoothing``) at the same epsilon, gamma and beta
   (``model.switch_method(fallback, **fallback_kwargs)``); ``"none"`` only
   rolls back. Both RobustModel methods retrace the compiled step (it reads
   ``params`` and ``method`` only when it is traced).
3. At the ``max_collapses``-th collapse it rolls back, applies no policy and
   sets ``model.stop_training = True``: training ends with the last good
   weights in the model.

Every measurement goes to python logging (INFO), to TensorBoard
(``<log_dir>/co_guard``: scalars ``co_guard/*``) and to
``<model_dir>/co_guard/measurements.jsonl``; every event (collapse, stop,
resume) also to logging (WARNING), TensorBoard text ``co_guard/event``,
``<model_dir>/co_guard/events.jsonl`` and :attr:`COGuard.events`. The state
needed to resume a killed run (collapse count, current method and params)
is in ``<model_dir>/co_guard/state.json`` and is re-applied by
``on_train_begin``.

Cost
----
Per measurement, with ``n`` examples in the fixed batch, PGD-``k`` and
``a = 1`` if the alignment is measured (else 0), the guard spends
``n * (k + 1 + 2a)`` gradient evaluations (plus 3n forward-only passes:
clean, PGD end point, FGSM end point). Relative to training with batch size
``B`` and ``g`` gradient evaluations per example per step (FGSM-RS: 2)::

    overhead = n * (k + 1 + 2a) / (every_steps * B * g)

The defaults (``config.CO_GUARD``, shared with ``bin/train``: n=128 examples,
k=10, every_steps=200, a=0) at B=128 with FGSM-RS give 1408 / 51200 = 2.75%;
n=256 every 100 steps costs 11% (4.7 measurements in a 469-step MNIST epoch).
:attr:`COGuard.extra_grad_evals` counts what was
actually spent (including the baseline measurement at the start of ``fit``).

Not handled: ``steps_per_execution > 1`` (``every_steps`` counts calls of
``on_train_batch_end``); the dropout RNG state is not rolled back (it is no
model weight); the caller's bookkeeping of gradient evaluations per step
(``callbacks.RunLog``) does not follow a method switch.
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import attacks, fileio, moved, objectives, rng
from tf_backsmooth import methods as methods_lib
from tf_backsmooth.config import (
    CO_GUARD,
    CO_POLICIES,
    CO_RULES,
    AttackParams,
    ConfigError,
    check_choice,
    check_epsilon,
    check_int,
    check_real,
)

log = logging.getLogger("tf_backsmooth")

POLICIES = CO_POLICIES + ("none",)
SUBDIR = "co_guard"
LAST_GOOD = "last_good.weights.h5"


# ----------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------
def collapse_detected(window, pgd_accuracy, fgsm_accuracy, drop=0.2, gap=0.2,
                      rule="drop_and_gap", floor=0.05):
    """Whether one measurement is a catastrophic-overfitting collapse.

    ``window``: PGD accuracies of the recent accepted measurements (may be
    empty: then the drop condition cannot hold). See the module docstring.
    """
    best = max(window) if len(window) else None
    dropped = best is not None and (best - pgd_accuracy) > drop
    gapped = (fgsm_accuracy - pgd_accuracy) > gap
    if rule == "drop_and_gap":
        return bool(dropped and gapped)
    if rule == "drop":
        return bool(dropped)
    if rule == "gap":
        return bool(gapped)
    if rule == "floor_and_gap":
        return bool(pgd_accuracy <= floor and gapped)
    raise ConfigError(f"rule must be one of {list(CO_RULES)} or a callable, "
                      f"got {rule!r}")


def overhead(examples, pgd_steps, every_steps, batch_size, grad_evals_per_step,
             alignment=False):
    """Guard gradient evaluations / training gradient evaluations."""
    per_measurement = examples * (pgd_steps + 1 + (2 if alignment else 0))
    return per_measurement / (every_steps * batch_size * grad_evals_per_step)


def _params_dict(params):
    return {"epsilon": params.epsilon, "step_size": params.step_size,
            "steps": params.steps, "gamma": params.gamma, "beta": params.beta,
            "extra": dict(params.extra)}


def _to_numpy(variables):
    return [np.array(v.numpy(), copy=True) for v in variables]


# ----------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------
def make_measure_fn(base_model, epsilon, pgd_steps=10, pgd_step_size=None,
                    alignment=False, seed=0):
    """A compiled ``(x, y) -> dict`` of per-batch mean accuracies (and alignment).

    Inference mode; PGD from a fixed-seed uniform start, FGSM from ``x``.
    Traced once per input shape; no boolean-mask indexing.
    """
    epsilon = float(epsilon)
    step = (2.5 * epsilon / pgd_steps if pgd_step_size is None
            else float(pgd_step_size))
    seed_t = tf.constant([int(seed), rng.CO_GUARD], tf.int32)

    def model_fn(t):
        return tf.cast(base_model(t, training=False), tf.float32)

    def fn(x, y):
        clean = objectives.correct(y, model_fn(x))
        x_pgd = attacks.pgd(model_fn, x, y, epsilon, step, pgd_steps,
                            seed=rng.fold_in(seed_t, rng.CO_GUARD_PGD))
        pgd = objectives.correct(y, model_fn(x_pgd))
        x_fgsm = attacks.fgsm(model_fn, x, y, epsilon, epsilon)
        fgsm = objectives.correct(y, model_fn(x_fgsm))
        out = {"clean_accuracy": tf.reduce_mean(clean),
               "pgd_accuracy": tf.reduce_mean(pgd),
               "fgsm_accuracy": tf.reduce_mean(fgsm)}
        if alignment:
            ce = lambda logits: objectives.cross_entropy(y, logits)  # noqa: E731
            _, g1, _ = attacks.input_gradient(model_fn, x, ce)
            eta = attacks.uniform_noise(
                tf.shape(x), epsilon, rng.fold_in(seed_t, rng.CO_GUARD_ALIGNMENT), x.dtype)
            _, g2, _ = attacks.input_gradient(
                model_fn, tf.clip_by_value(x + eta, 0.0, 1.0), ce)
            cos, nonzero = objectives.gradient_cosine(g1, g2)
            out["alignment"] = (tf.reduce_sum(cos * nonzero)
                                / tf.maximum(tf.reduce_sum(nonzero), 1.0))
        return out

    return tf.function(fn, reduce_retracing=True)


# ----------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------
class COGuard(keras.callbacks.Callback):
    """Detects catastrophic overfitting during ``fit`` and rolls back.

    Args:
      x, y: the fixed training batch the guard measures on (images in
        ``[0, 1]``, uint8 images are divided by 255; integer labels). Needed
        unless ``measure_fn`` is given.
      every_steps: measure every this many training steps. Defaults of
        this and the other rule/policy arguments: ``config.CO_GUARD`` (the
        table ``bin/train``'s ``--co_guard_*`` flags also default to).
      epsilon: attack budget of the measurement (default: the model's).
      pgd_steps, pgd_step_size: PGD of the measurement (step default
        ``2.5 * eps / pgd_steps``).
      alignment: also measure the gradient alignment (2 more gradient
        evaluations per example; logged, not used by the default rule).
      drop, gap, rule, window, healthy_drop, floor: the collapse rule (see
        the module docstring); ``window`` counts accepted measurements.
      policy: ``"shrink_step"``, ``"switch_method"`` or ``"none"``.
      factor: step-size multiplier of ``"shrink_step"`` (in ``(0, 1)``).
      fallback, fallback_kwargs: the method of ``"switch_method"``.
      max_collapses: stop training at this many collapses (>= 1).
      model_dir: writes ``co_guard/`` (snapshot, jsonl logs, state) here.
      log_dir: TensorBoard root; the guard writes ``<log_dir>/co_guard``.
      seed: seed of the measurement's PGD random start (fixed, so successive
        measurements differ only through the weights).
      measure_fn: replaces the measurement: ``measure_fn(model) -> dict``
        with ``pgd_accuracy`` and ``fgsm_accuracy`` (optionally
        ``clean_accuracy``, ``alignment``); for tests and custom probes.
      measure_at_start: measure (and snapshot) before the first step of
        ``fit`` (after the backup restored a resumed run).
      restore_iterations: roll back ``optimizer.iterations`` too (exact
        restore; the learning-rate schedule then replays the rolled-back
        steps). False keeps the counter.
      resume: re-apply ``<model_dir>/co_guard/state.json`` (collapse count,
        method, params) in ``on_train_begin``.
      is_chief: only the chief writes files and summaries.

    Attributes: ``events`` (list of dicts), ``history`` (all measurements),
    ``collapses``, ``extra_grad_evals``, ``last_good_step``.
    """

    def __init__(self, x=None, y=None, *, every_steps=CO_GUARD.every_steps,
                 epsilon=None, pgd_steps=CO_GUARD.pgd_steps, pgd_step_size=None,
                 alignment=False, drop=CO_GUARD.drop, gap=CO_GUARD.gap, rule=CO_GUARD.rule,
                 window=CO_GUARD.window, healthy_drop=None, floor=CO_GUARD.floor,
                 policy=CO_GUARD.policy, factor=CO_GUARD.factor, fallback=CO_GUARD.fallback,
                 fallback_kwargs=None, max_collapses=CO_GUARD.max_collapses,
                 model_dir=None, log_dir=None, seed=0,
                 measure_fn=None, measure_at_start=True,
                 restore_iterations=True, resume=True, is_chief=True):
        super().__init__()
        self.every_steps = check_int("every_steps", every_steps, low=1)
        self.epsilon = check_epsilon(epsilon, allow_none=True)
        self.pgd_steps = check_int("pgd_steps", pgd_steps, low=1)
        self.pgd_step_size = check_real("pgd_step_size", pgd_step_size,
                                        low=0.0, low_open=True, high=1.0,
                                        allow_none=True)
        self.alignment = bool(alignment)
        self.drop = check_real("drop", drop, low=0.0, high=1.0)
        self.gap = check_real("gap", gap, low=0.0, high=1.0)
        if not callable(rule):
            check_choice("rule", rule, CO_RULES)
        self.rule = rule
        self.window = check_int("window", window, low=1)
        self.floor = check_real("floor", floor, low=0.0, high=1.0)
        self.healthy_drop = check_real(
            "healthy_drop", self.drop / 2 if healthy_drop is None
            else healthy_drop, low=0.0, high=1.0)
        self.policy = check_choice("policy", policy, POLICIES)
        self.factor = check_real("factor", factor, low=0.0, low_open=True,
                                 high=1.0, high_open=True)
        self.fallback = fallback
        self.fallback_kwargs = dict(fallback_kwargs or {})
        if policy == "switch_method":
            methods_lib.get(fallback)  # fails early on an unknown name
        self.max_collapses = check_int("max_collapses", max_collapses, low=1)
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.seed = check_int("seed", seed, low=0)
        self.measure_at_start = bool(measure_at_start)
        self.restore_iterations = bool(restore_iterations)
        self.resume = bool(resume)
        self.is_chief = bool(is_chief)
        self._custom_measure = measure_fn
        if measure_fn is None:
            if x is None or y is None:
                raise ConfigError("COGuard needs the fixed batch x, y "
                                  "(or a measure_fn)")
            x = np.asarray(x)
            if x.dtype == np.uint8:
                x = x.astype(np.float32) / 255.0
            self.x = tf.constant(x.astype(np.float32))
            self.y = tf.constant(np.asarray(y).astype(np.int64))
            if len(x) == 0 or len(x) != len(np.asarray(y)):
                raise ConfigError(
                    f"x and y must be non-empty and of equal length, got "
                    f"{len(x)} and {len(np.asarray(y))}")
            self.num_examples = int(len(x))
        else:
            self.x = self.y = None
            self.num_examples = 0 if x is None else int(len(x))
        self.grad_evals_per_measurement = (
            0 if measure_fn is not None else
            self.num_examples * (self.pgd_steps + 1 + (2 if alignment else 0)))

        self.events = []
        self.history = []
        self.collapses = 0
        self.extra_grad_evals = 0
        self.measure_seconds = 0.0
        self.last_good_step = None
        self._window = []        # accepted measurements (dicts)
        self._last_good = None   # dict: weights, optimizer, measurement
        self._measure_fn = None
        self._measure_model = None
        self._writer = None
        self._step = 0           # training steps seen (monotonic)
        self._started = False
        self._resumed = False

    # ------------------------------------------------------------- paths
    def _dir(self):
        if not self.model_dir:
            return None
        path = os.path.join(self.model_dir, SUBDIR)
        if self.is_chief:
            os.makedirs(path, exist_ok=True)
        return path

    @property
    def last_good_path(self):
        d = self._dir()
        return None if d is None else os.path.join(d, LAST_GOOD)

    # --------------------------------------------------------- measuring
    def _base(self):
        return getattr(self.model, "base_model", self.model)

    def _epsilon(self):
        if self.epsilon is not None:
            return self.epsilon
        params = getattr(self.model, "params", None)
        eps = getattr(params, "epsilon", 0.0) if params is not None else 0.0
        if not eps:
            raise ConfigError("COGuard: the model has no attack epsilon "
                              "(method natural?); pass epsilon=")
        return float(eps)

    def measure(self):
        """One measurement now (no decision); a dict of floats."""
        start = time.perf_counter()
        if self._custom_measure is not None:
            raw = self._custom_measure(self.model)
        else:
            base = self._base()
            if self._measure_fn is None or self._measure_model is not base:
                self._measure_fn = make_measure_fn(
                    base, self._epsilon(), self.pgd_steps, self.pgd_step_size,
                    self.alignment, self.seed)
                self._measure_model = base
            raw = self._measure_fn(self.x, self.y)
        out = {k: float(keras.ops.convert_to_numpy(v)) for k, v in raw.items()}
        self.extra_grad_evals += self.grad_evals_per_measurement
        self.measure_seconds += time.perf_counter() - start
        return out

    # ---------------------------------------------------------- snapshot
    def _snapshot(self, measurement):
        model = self.model
        opt = model.optimizer
        self._last_good = {
            "weights": _to_numpy(model.weights),
            "optimizer": _to_numpy(opt.variables) if opt is not None else [],
            "measurement": dict(measurement),
            "step": self._step,
        }
        self.last_good_step = self._step
        path = self.last_good_path
        if path and self.is_chief:
            fileio.save_weights(model, path)
            fileio.write_json(os.path.join(os.path.dirname(path),
                                           "last_good.json"),
                              {"step": self._step, "measurement": measurement})

    def _restore(self):
        snap = self._last_good
        model = self.model
        for var, value in zip(model.weights, snap["weights"]):
            var.assign(value)
        opt = model.optimizer
        if opt is not None:
            iterations = getattr(opt, "iterations", None)
            for var, value in zip(opt.variables, snap["optimizer"]):
                if (not self.restore_iterations and iterations is not None
                        and var is iterations):
                    continue
                var.assign(value)

    # ------------------------------------------------------------ policy
    def _apply_policy(self):
        model = self.model
        if self.policy == "shrink_step":
            old = model.params.step_size
            model.set_params(step_size=old * self.factor)
            return {"policy": "shrink_step", "old_step_size": old,
                    "new_step_size": model.params.step_size}
        if self.policy == "switch_method":
            old = model.method_name
            if old == self.fallback:
                return {"policy": "switch_method", "method": old,
                        "note": "already on the fallback method; rollback only"}
            model.switch_method(self.fallback, **self.fallback_kwargs)
            return {"policy": "switch_method", "old_method": old,
                    "new_method": self.fallback,
                    "new_params": _params_dict(model.params)}
        return {"policy": "none"}

    # ----------------------------------------------------------- logging
    def _record_event(self, event):
        event = {"time": time.time(), **event}
        self.events.append(event)
        log.warning("COGuard: %s", json.dumps(event, sort_keys=True))
        d = self._dir()
        if d and self.is_chief:
            fileio.append_jsonl(os.path.join(d, "events.jsonl"), event)
        if self._writer is not None:
            with self._writer.as_default():
                tf.summary.text("co_guard/event",
                                json.dumps(event, sort_keys=True),
                                step=self._step)
            self._writer.flush()
        self._write_state()

    def _record_measurement(self, m):
        self.history.append(m)
        log.info("COGuard step %d: pgd %.3f fgsm %.3f clean %s%s%s",
                 m["step"], m["pgd_accuracy"], m["fgsm_accuracy"],
                 _fmt(m.get("clean_accuracy")),
                 "" if "alignment" not in m else
                 f" alignment {m['alignment']:.3f}",
                 " COLLAPSE" if m["collapse"] else "")
        d = self._dir()
        if d and self.is_chief:
            fileio.append_jsonl(os.path.join(d, "measurements.jsonl"), m)
        if self._writer is not None:
            with self._writer.as_default():
                for key in ("pgd_accuracy", "fgsm_accuracy", "clean_accuracy",
                            "alignment", "step_size"):
                    if m.get(key) is not None:
                        tf.summary.scalar(f"co_guard/{key}", m[key],
                                          step=m["step"])
                tf.summary.scalar("co_guard/fgsm_minus_pgd",
                                  m["fgsm_accuracy"] - m["pgd_accuracy"],
                                  step=m["step"])
                tf.summary.scalar("co_guard/collapses", self.collapses,
                                  step=m["step"])
                tf.summary.scalar("co_guard/extra_grad_evals",
                                  float(self.extra_grad_evals),
                                  step=m["step"])
            self._writer.flush()

    def _write_state(self):
        d = self._dir()
        if not d or not self.is_chief:
            return
        model = self.model
        fileio.write_json(os.path.join(d, "state.json"), {
            "collapses": self.collapses,
            "method": getattr(model, "method_name", None),
            "params": (_params_dict(model.params)
                       if hasattr(model, "params") else None),
            "extra_grad_evals": self.extra_grad_evals,
            "stopped": self.collapses >= self.max_collapses,
        })

    # ------------------------------------------------------------ checks
    def _is_collapse(self, m):
        if callable(self.rule):
            return bool(self.rule(list(self._window), m))
        return collapse_detected([w["pgd_accuracy"] for w in self._window],
                                 m["pgd_accuracy"], m["fgsm_accuracy"],
                                 self.drop, self.gap, self.rule, self.floor)

    def _is_healthy(self, m):
        if not self._window:
            return True
        best = max(w["pgd_accuracy"] for w in self._window)
        return best - m["pgd_accuracy"] <= self.healthy_drop

    def _check(self):
        m = self.measure()
        model = self.model
        m.update(step=self._step,
                 iterations=int(model.optimizer.iterations.numpy()),
                 method=getattr(model, "method_name", None),
                 step_size=getattr(getattr(model, "params", None),
                                   "step_size", None))
        first = self._last_good is None
        m["collapse"] = (not first) and self._is_collapse(m)
        self._record_measurement(m)
        if m["collapse"]:
            self._on_collapse(m)
            return
        healthy = first or self._is_healthy(m)
        self._window = (self._window + [m])[-self.window:]
        if healthy:
            self._snapshot(m)

    def _on_collapse(self, m):
        self.collapses += 1
        self._restore()
        good = self._last_good["measurement"]
        event = {
            "event": "collapse", "collapse": self.collapses, "step": self._step,
            "measurement": {k: m[k] for k in m if k.endswith("accuracy")
                            or k == "alignment"},
            "window_best_pgd_accuracy": max(
                [w["pgd_accuracy"] for w in self._window], default=None),
            "restored_step": self._last_good["step"],
            "restored_measurement": {k: good[k] for k in good
                                     if k.endswith("accuracy")},
            "method": getattr(self.model, "method_name", None),
            "extra_grad_evals": self.extra_grad_evals,
        }
        if self.collapses >= self.max_collapses:
            self.model.stop_training = True
            event["action"] = "stop"
            event["message"] = (
                f"catastrophic overfitting {self.collapses} time(s) "
                f"(max_collapses={self.max_collapses}): training stopped with "
                f"the last good weights of step {self._last_good['step']} "
                f"(PGD accuracy {good['pgd_accuracy']:.3f} on the guard batch)")
        else:
            event["action"] = "rollback"
            event.update(self._apply_policy())
        # The restored state is the last good measurement: the window starts
        # again from it.
        self._window = [good]
        self._record_event(event)
        if event["action"] == "stop":
            log.error("COGuard: %s", event["message"])

    # ------------------------------------------------------------- Keras
    def on_train_begin(self, logs=None):
        self._started = False
        if self.log_dir and self.is_chief and self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, SUBDIR))
        d = self._dir()
        path = None if d is None else os.path.join(d, "state.json")
        if (self.resume and not self._resumed and not self.history and path
                and os.path.exists(path)):
            self._resume_from(path)
        self._resumed = True

    def _resume_from(self, path):
        state = fileio.read_json(path)
        model = self.model
        self.collapses = int(state.get("collapses", 0))
        self.extra_grad_evals = int(state.get("extra_grad_evals", 0))
        changed = {}
        name = state.get("method")
        if name and hasattr(model, "method_name") and name != model.method_name:
            model.switch_method(name)
            changed["method"] = name
        p = state.get("params")
        if p and hasattr(model, "params"):
            params = AttackParams(p["epsilon"], p["step_size"], p["steps"],
                                  p["gamma"], p["beta"], p["extra"]).validate()
            if params != model.params:
                model.set_params(epsilon=p["epsilon"], step_size=p["step_size"],
                                 steps=p["steps"], gamma=p["gamma"],
                                 beta=p["beta"], **p["extra"])
                changed["params"] = p
        self.events.append({"event": "resume", "time": time.time(),
                            "collapses": self.collapses, **changed})
        log.warning("COGuard: resumed from %s (%d collapse(s) so far%s)", path,
                    self.collapses, f"; re-applied {changed}" if changed else "")

    def on_train_batch_begin(self, batch, logs=None):
        if self._started:
            return
        self._started = True
        if self._step == 0:
            self._step = int(self.model.optimizer.iterations.numpy())
        if self.measure_at_start or self._last_good is None:
            # After every on_train_begin (the backup has restored a
            # resumed run): the baseline and the first snapshot.
            self._window = []
            self._last_good = None
            self._check()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_steps == 0 and not self._warming_up():
            self._check()

    def _warming_up(self):
        """Whether an epsilon schedule still trains below the full epsilon.

        The guard measures at the full epsilon; during a warm-up the model is
        not yet meant to be robust there, and the FGSM-PGD gap would read as
        a collapse. Measuring resumes once the schedule reaches epsilon."""
        warming_up = getattr(self.model, "warming_up", None)
        return warming_up is not None and warming_up()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["co_guard_collapses"] = float(self.collapses)
        logs["co_guard_extra_grad_evals"] = float(self.extra_grad_evals)
        if self.history:
            last = self.history[-1]
            logs["co_guard_pgd_accuracy"] = last["pgd_accuracy"]
            logs["co_guard_fgsm_accuracy"] = last["fgsm_accuracy"]

    def on_train_end(self, logs=None):
        log.info("COGuard: %d collapse(s), %d extra gradient evaluations "
                 "(%d measurements, %.1f s)", self.collapses,
                 self.extra_grad_evals, len(self.history),
                 self.measure_seconds)
        self._write_state()
        if self._writer is not None:
            self._writer.flush()

    def summary(self):
        """A JSON-friendly summary for the run manifest / results."""
        return {"collapses": self.collapses,
                "extra_grad_evals": self.extra_grad_evals,
                "measurements": len(self.history),
                "measure_seconds": self.measure_seconds,
                "last_good_step": self.last_good_step,
                "events": list(self.events)}


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


__all__ = ["COGuard", "collapse_detected", "make_measure_fn", "overhead", "POLICIES"]

# Names that lived here before 0.2.0: reading one says where it is now.
MOVED = {
    'RULES': 'tf_backsmooth.config.CO_RULES',
    'retrace': 'RobustModel.retrace()',
    'set_step_size': 'RobustModel.set_params(step_size=...)',
    'switch_method': 'RobustModel.switch_method(name)',
}
__getattr__ = moved.getattr_for(__name__, MOVED)
