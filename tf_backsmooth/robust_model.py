"""``RobustModel``: a ``keras.Model`` whose ``train_step`` runs robust training.

Usage::

    base = tf_backsmooth.models.get("small_cnn", 10, (28, 28, 1))
    model = RobustModel(base, method="backward_smoothing", epsilon=0.3)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    model.fit(train_ds, epochs=10)
    model.save("model.keras")   # exports the plain base classifier
    model.set_params(epsilon=0.2)              # from the next step on
    model.switch_method("trades", steps=10)    # same epsilon, gamma, beta

How a step runs
---------------
``train_step`` (called by Keras once per replica) derives a stateless seed from
``(seed, optimizer step, replica id)`` and calls the per-replica function
``_grads_and_stats`` -- attack, objective and gradients -- which is compiled
with XLA when enabled. The gradients leave that function and
``optimizer.apply`` runs outside it, so XLA never wraps ``strategy.run`` or
the cross-replica all-reduce (which fails, and which XLA does not implement for
CPU devices). For the same reason ``compile`` always hands Keras
``jit_compile=False`` and keeps the caller's request for the inner function;
:attr:`RobustModel.xla` reports the state actually used.
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import cpu, fastgrad, fused_bn, moved, objectives, rng, schedules, xla_plan
from tf_backsmooth import methods as methods_lib

log = logging.getLogger("tf_backsmooth")

TRAIN_METRICS = ("loss", "natural_loss", "robust_loss", "clean_accuracy",
                 "adv_accuracy")


_BATCH_STAT_LAYERS = (keras.layers.BatchNormalization,)

# Inputs this far outside [0, 1] are rejected (float rounding stays inside).
_RANGE_TOLERANCE = 1e-3


def _first_inputs(x):
    """The inputs of the first batch of ``fit``/``evaluate`` data, read
    without consuming it (``None`` for data that cannot be peeked, e.g. a
    Python generator)."""
    if isinstance(x, tf.data.Dataset):
        for batch in x.take(1):
            return (keras.utils.unpack_x_y_sample_weight(batch)[0]
                    if isinstance(batch, tuple) else batch)
        return None
    if isinstance(x, keras.utils.PyDataset):
        batch = x[0]
        return (keras.utils.unpack_x_y_sample_weight(batch)[0]
                if isinstance(batch, tuple) else batch)
    if isinstance(x, (np.ndarray, tf.Tensor)) or hasattr(x, "__array__"):
        return x
    return None


def check_input_range(x):
    """Raises ValueError unless the first batch of ``x`` lies in ``[0, 1]``.

    Epsilon and every attack step are in units of ``[0, 1]`` pixels and
    adversarial examples are clipped to ``[0, 1]``, so unscaled images
    (uint8 or float 0..255) or standardised inputs would train silently with
    a meaningless epsilon. Checked on the host, outside the compiled step.
    """
    inputs = _first_inputs(x)
    if inputs is None or isinstance(inputs, (dict, list, tuple)):
        return
    values = np.asarray(inputs)
    if values.size == 0 or not np.issubdtype(values.dtype, np.number):
        return
    lo, hi = float(np.min(values)), float(np.max(values))
    if lo >= -_RANGE_TOLERANCE and hi <= 1 + _RANGE_TOLERANCE:
        return
    raise ValueError(
        f"RobustModel expects images scaled to [0, 1] (epsilon and the attack "
        f"steps are in those units), but the first batch holds values in "
        f"[{lo:g}, {hi:g}] (dtype {values.dtype}). Divide by 255 (e.g. "
        "x / 255.0, or dataset.map(lambda x, y: (tf.cast(x, tf.float32) / "
        "255.0, y))) and put any standardisation inside the model as its "
        "first layer (keras.layers.Normalization)")


class _ModelFn:
    """``x -> base_model(x, training)``, tagged for methods.forward_pair."""

    def __init__(self, model, training, batch_independent):
        self.model, self.training = model, training
        self.batch_independent = batch_independent

    def __call__(self, x):
        return self.model(x, training=self.training)


class RobustModel(keras.Model):
    """Wraps a classifier (``[0, 1]`` images -> logits) for robust training.

    Args:
      base_model: the Keras classifier; available as ``model.base_model``.
      method: a name from :func:`tf_backsmooth.methods.names`.
      epsilon, step_size, steps: attack budget (pixel units), step size and
        number of steps; ``None`` takes the method's reference default.
        ``natural`` takes none of them.
      gamma: Backward Smoothing's logit-noise scale (default 1).
      beta: TRADES-style KL weight (default 6).
      seed: base of the stateless attack noise; noise for a step is keyed on
        ``(seed, optimizer.iterations, replica id)``, so a run repeats exactly.
      log_clean_accuracy: compute ``clean_accuracy`` even for methods whose
        objective never sees clean inputs (costs one inference forward pass).
      epsilon_schedule: ``None`` (constant ``epsilon``) or a callable
        ``step -> epsilon`` of the optimizer's iteration count, e.g.
        ``schedules.EpsilonWarmup(0.3, 1000)`` or any
        ``keras.optimizers.schedules.LearningRateSchedule``. Every step size
        scales with it (``step_size * epsilon(step) / epsilon``); epsilon is
        a tensor inside the step (traced once) and logged as ``epsilon``. It
        depends only on the step count, so a resumed run and every replica
        follow the same schedule. See :mod:`tf_backsmooth.schedules`.
      **method_kwargs: method-specific keywords (``random_start``,
        ``lambda_``, ``attack_training`` ...).

    Raises ``ValueError`` naming the parameter for any bad value.
    """

    def __init__(self, base_model, method="backward_smoothing", epsilon=None,
                 step_size=None, steps=None, gamma=None, beta=None, seed=0,
                 log_clean_accuracy=True, epsilon_schedule=None, name=None,
                 **method_kwargs):
        if not isinstance(base_model, keras.Model):
            raise TypeError(
                f"base_model must be a keras.Model, got {type(base_model)}")
        super().__init__(name=name or f"robust_{base_model.name}")
        self.base_model = base_model
        resolved = self._resolve(method, dict(
            epsilon=epsilon, step_size=step_size, steps=steps, gamma=gamma,
            beta=beta, **method_kwargs))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.epsilon_schedule = schedules.check_schedule(epsilon_schedule)
        self.log_clean_accuracy = log_clean_accuracy
        self._apply(*resolved)
        # clean_accuracy always exists: test_step reports it.
        self._trackers = {n: keras.metrics.Mean(name=n)
                          for n in TRAIN_METRICS}
        self._plan = xla_plan.StepPlan(False, "not compiled", False)
        self._step_fn = None
        # measure_xla's decisions, keyed on _measure_key().
        self._xla_measured = {}
        # Whether one call on a concatenated batch equals two calls (no
        # layer computes batch statistics); see methods.forward_pair.
        if base_model.built:
            self.built = True  # the wrapper owns no weights of its own
        self.batch_independent = not any(
            isinstance(layer, _BATCH_STAT_LAYERS)
            for layer in base_model._flatten_layers())

    # ------------------------------------------------------- method, params
    @staticmethod
    def _resolve(name, args):
        """``(method, params, args)`` for method ``name`` built with the
        keywords ``args``; raises ConfigError naming a bad value. Changes
        nothing."""
        return (methods_lib.get(name), methods_lib.resolve_params(name, **args),
                dict(args))

    def _apply(self, method, params, args):
        """Makes ``method``/``params`` the model's (after ``_resolve``)."""
        if self.epsilon_schedule is not None and method.attack is None:
            raise methods_lib.ConfigError(
                f"method {method.name!r} runs no attack; epsilon_schedule does "
                "not apply")
        self.method_name = method.name
        self.method = method
        self.params = params
        self._param_args = args
        self._logged = self._logged_metrics()

    def _logged_metrics(self):
        """The training metrics logged for the current method."""
        logged = ["loss", "natural_loss", "robust_loss"]
        if self.log_clean_accuracy or self.method.clean_in_objective:
            logged.append("clean_accuracy")
        if self.method.attack is not None:
            logged.append("adv_accuracy")
        return tuple(logged)

    def set_params(self, **kwargs):
        """Changes attack parameters; the next training step uses them.

        Takes the constructor's keywords (``epsilon``, ``step_size``,
        ``steps``, ``gamma``, ``beta`` and the method's own, e.g.
        ``random_start``): the model then trains exactly as a RobustModel
        built with its earlier keywords updated by these (``None`` returns a
        keyword to the method's default). So a step size left to its default
        follows a new ``epsilon``, and one given explicitly is kept.
        Validated as by the constructor (ConfigError naming the value, and
        nothing changed); retraces the step (:meth:`retrace`). Returns the new
        :attr:`params`.
        """
        return self._change(self.method_name, {**self._param_args, **kwargs})

    def switch_method(self, name, **kwargs):
        """Trains with method ``name`` from the next step on.

        As a RobustModel built with ``method=name``, the current ``epsilon``
        (when both methods run an attack), ``gamma`` and ``beta``, and
        ``kwargs``; every other parameter takes ``name``'s default. Validated
        as by the constructor; retraces the step. Returns the new
        :attr:`params`.
        """
        old = self.params
        args = {"gamma": old.gamma, "beta": old.beta}
        method = methods_lib.get(name)
        if method.attack is not None and self.method.attack is not None:
            args["epsilon"] = old.epsilon
        return self._change(name, {**args, **kwargs})

    def _change(self, name, args):
        args = {k: v for k, v in args.items() if v is not None}
        self._apply(*self._resolve(name, args))
        self.retrace()
        return self.params

    def retrace(self):
        """Makes the next training step re-read :attr:`method` and
        :attr:`params` (read only while the step is traced).

        :meth:`set_params` and :meth:`switch_method` call it. The cached
        per-replica step and Keras' train function that captured it are both
        rebuilt; ``train_function`` is replaced, never set to None, since
        Keras' ``fit`` loop calls it directly (so this works from a callback
        during ``fit``, under any strategy, with XLA on or off).
        """
        self._step_fn = None
        if getattr(self, "train_function", None) is not None:
            self.make_train_function(force=True)

    # ------------------------------------------------------------------ Keras
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Skips Keras' symbolic build when everything is already built.

        Under a strategy, Keras 3.15 builds by pulling one batch from the
        distributed iterator and reducing it with ``strategy.reduce``, which
        (a) fails for MultiWorkerMirroredStrategy (PerReplica values cannot be
        converted; tensorflow/tensorflow#72388) and (b) consumes a batch of a
        persistent iterator. RobustModel has no compiled loss or metrics to
        build, and the base classifier is built on construction, so only the
        optimizer may still need building.
        """
        if all(layer.built for layer in self._flatten_layers()):
            if self.optimizer is not None and not self.optimizer.built:
                with self.distribute_strategy.scope():
                    self.optimizer.build(self.trainable_variables)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None,
                jit_compile="auto", run_eagerly=False, **kwargs):
        """As ``keras.Model.compile``; the loss comes from the method.

        ``jit_compile`` applies to the per-replica attack + loss + gradient
        function (see the module docstring); Keras itself gets ``False``.
        """
        if loss is not None:
            raise ValueError(
                "RobustModel computes its loss from `method`; do not pass "
                f"loss= to compile (got {loss!r})")
        if metrics:
            raise ValueError(
                "RobustModel logs its own metrics (" + ", ".join(TRAIN_METRICS)
                + "); use callbacks for more, not compile(metrics=...)")
        super().compile(optimizer=optimizer, jit_compile=False,
                        run_eagerly=run_eagerly, **kwargs)
        if self.built and not self.optimizer.built:
            # Now, not at the first step: `load_weights` before the first
            # `fit` then restores the optimizer state (step count, moments)
            # instead of skipping it with a warning.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        if run_eagerly:
            self._plan = xla_plan.StepPlan(False, "run_eagerly", True)
        elif any(getattr(layer, "synchronized", False)
                 for layer in self.base_model._flatten_layers()):
            # Synchronised BatchNorm all-reduces inside the step: a
            # cross-replica merge_call, which neither XLA nor a nested
            # tf.function supports, so the step is inlined in Keras' graph.
            self._plan = xla_plan.StepPlan(False, "synchronized BatchNorm", True)
        else:
            self._plan = xla_plan.StepPlan(*xla_plan.resolve_xla(jit_compile, **self._xla_facts()),
                                  False)
        self._jit_request = jit_compile
        self._step_fn = None
        log.info("RobustModel(%s): XLA for the per-replica step: %s (%s)",
                 self.method_name, "on" if self.xla else "off", self.xla_reason)
        log.info("RobustModel(%s): %s; attack Conv2D input gradient: %s; training "
                 "BatchNorm: %s", self.method_name, cpu.summary(), fastgrad.describe(),
                 fused_bn.describe() if not self.batch_independent else "no BatchNorm layer")

    @property
    def xla(self):
        """Whether the per-replica step is XLA-compiled (set by ``compile``)."""
        return self._plan.xla

    @property
    def xla_reason(self):
        """Why :attr:`xla` has its value (``"requested"``, ``"synchronized
        BatchNorm"``, ...; ``"not compiled"`` before ``compile``)."""
        return self._plan.reason

    def fit(self, x=None, y=None, *args, **kwargs):
        """As ``keras.Model.fit``; the first batch must lie in ``[0, 1]``
        (:func:`check_input_range`). Labels may be class ids or one-hot /
        label-smoothed targets."""
        check_input_range(x)
        if self._measurement_pending():
            batch_size = kwargs.get("batch_size", args[0] if args else None)
            self.measure_xla(x, y, batch_size=batch_size)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        check_input_range(x)
        return super().evaluate(x, y, *args, **kwargs)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def get_config(self):
        # Only the base classifier is ever serialised (see `save`).
        return {"method": self.method_name}

    def save(self, filepath, overwrite=True, **kwargs):
        """Exports the base classifier as a plain Keras model.

        The file holds only built-in Keras objects, so it loads with
        ``keras.models.load_model`` without tf_backsmooth installed.
        """
        return self.base_model.save(filepath, overwrite=overwrite, **kwargs)

    # ------------------------------------------------------------ the step
    def step_seed(self, step, replica_id):
        """The stateless seed for one (step, replica): public for tests."""
        base = tf.constant([self.seed, 0], tf.int32)
        return rng.fold_in(rng.fold_in(base, step), replica_id)

    def epsilon_at(self, step):
        """The training epsilon at optimizer step ``step`` (a float32 tensor)."""
        if self.epsilon_schedule is None:
            return tf.constant(self.params.epsilon, tf.float32)
        return tf.cast(self.epsilon_schedule(step), tf.float32)

    def warming_up(self, step=None):
        """Whether the epsilon schedule is still below ``epsilon`` at ``step``
        (default: the optimizer's current step); False without a schedule."""
        if self.epsilon_schedule is None:
            return False
        step = self.optimizer.iterations if step is None else step
        return float(self.epsilon_at(step)) < self.params.epsilon * (1 - 1e-6)

    def _scheduled_params(self, epsilon):
        """``params`` at a scheduled ``epsilon`` (a tensor): step sizes scale
        with it, so step_size / epsilon stays the method's ratio."""
        params = self.params
        if epsilon is None:
            return params
        scale = epsilon / params.epsilon
        return dataclasses.replace(params, epsilon=epsilon,
                                   step_size=params.step_size * scale)

    def _grads_and_stats(self, x, y, sample_weight, seed, epsilon=None):
        """Attack + objective + gradients for one replica's batch.

        ``epsilon`` (a scalar tensor) overrides the attack budget of this
        step when an epsilon schedule is set; ``None`` keeps ``params``.
        Training-mode BatchNorm runs as one fused kernel here (see
        :mod:`tf_backsmooth.fused_bn`; equal to Keras' up to rounding).
        """
        with fused_bn.training_override(self.base_model):
            return self._attack_and_objective(x, y, sample_weight, seed, epsilon)

    def _attack_and_objective(self, x, y, sample_weight, seed, epsilon):
        method = self.method
        params = self._scheduled_params(epsilon)
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        attack_fn = lambda t: self.base_model(  # noqa: E731
            t, training=params.get("attack_training"))
        train_fn = _ModelFn(self.base_model, True, self.batch_independent)

        if method.attack is not None:
            out = method.attack(attack_fn, x, y, params,
                                rng.fold_in(seed, rng.TRAIN_ATTACK))
        else:
            out = methods_lib.AttackOutput(None)
        with tf.GradientTape() as tape:
            terms = method.objective(train_fn, x, y, out, params,
                                     rng.fold_in(seed, rng.TRAIN_OBJECTIVE))
            loss = objectives.replica_mean(terms.natural + terms.robust,
                                           sample_weight, num_replicas)
            if self.base_model.losses:  # weight regularisers
                loss += tf.add_n(self.base_model.losses) / num_replicas
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.trainable_variables)

        clean_logits = terms.clean_logits
        if clean_logits is None:
            clean_logits = out.clean_logits
        if clean_logits is None and self.log_clean_accuracy:
            clean_logits = self.base_model(x, training=False)
        stats = {
            "loss": terms.natural + terms.robust,
            "natural_loss": terms.natural,
            "robust_loss": terms.robust,
        }
        if clean_logits is not None and "clean_accuracy" in self._logged:
            stats["clean_accuracy"] = objectives.correct(y, clean_logits)
        if terms.adv_logits is not None and "adv_accuracy" in self._logged:
            stats["adv_accuracy"] = objectives.correct(y, terms.adv_logits)
        return grads, stats

    def _xla_facts(self):
        """What ``jit_compile="auto"`` decides on (see :func:`xla_plan.resolve_xla`)."""
        return {"batch_norm": not self.batch_independent,
                "attack_steps": (self.params.steps if self.method.attack
                                 is not None else 0)}

    def _measure_key(self):
        facts = self._xla_facts()
        return (self.method_name, facts["attack_steps"], facts["batch_norm"])

    def _measurement_pending(self):
        return (getattr(self, "_jit_request", None) == "auto"
                and not self._plan.inline
                and xla_plan.xla_needs_measurement("auto", **self._xla_facts())
                and self._measure_key() not in self._xla_measured)

    def measure_xla(self, x, y=None, batch_size=None, repeats=3):
        """Chooses XLA or graph mode for the per-replica step by timing both.

        Only acts where ``compile(jit_compile="auto")`` left the choice to a
        measurement (:func:`xla_plan.xla_needs_measurement`: a CPU, BatchNorm, an
        unrolled attack); ``fit`` calls it on its first batch. It takes the
        first batch of ``x`` (a ``tf.data.Dataset``, a ``PyDataset``, or
        arrays with labels ``y`` and ``batch_size``, default 32), runs the
        attack + loss + gradient function once in each mode (tracing and
        compiling), then ``repeats`` more times in each, alternated, and
        keeps XLA only if its fastest call beats graph mode's by
        :data:`XLA_MARGIN`. Every variable of the base model (BatchNorm
        statistics included) is restored afterwards, so training is exactly
        as without the measurement. Under a distribution strategy, or with
        data that cannot be peeked, nothing is timed and graph mode stays.
        The decision, with the times, is logged and becomes
        :attr:`xla_reason`; it holds for this method and attack length
        (``set_params``/``switch_method`` back to them reuse it).

        Returns ``(xla, reason)``.
        """
        if not self._measurement_pending():
            return self.xla, self.xla_reason
        rule = xla_plan.resolve_xla("auto", **self._xla_facts())[1]
        rule = rule[:-len(xla_plan.UNMEASURED)]
        fn = None
        if type(self.distribute_strategy).__name__ != "_DefaultDistributionStrategy":
            plan = xla_plan.StepPlan(False, rule + ": not measured under a distribution "
                            "strategy; graph mode", False)
        else:
            batch = xla_plan.first_batch(x, y, batch_size)
            if batch is None:
                plan = xla_plan.StepPlan(False, rule + ": not measured (no batch with "
                                "labels could be read ahead); graph mode", False)
            else:
                plan, fn = self._time_modes(batch, rule, repeats)
        self._xla_measured[self._measure_key()] = plan
        self.retrace()
        self._plan, self._step_fn = plan, fn
        log.info("RobustModel(%s): XLA for the per-replica step: %s (%s)",
                 self.method_name, "on" if plan.xla else "off", plan.reason)
        return self.xla, self.xla_reason

    def _time_modes(self, batch, rule, repeats):
        """(plan, the winning tf.function) from timing both modes."""
        x, y, sample_weight = batch
        x = tf.cast(tf.convert_to_tensor(x), tf.float32)
        y = tf.convert_to_tensor(y)
        if sample_weight is not None:
            sample_weight = tf.convert_to_tensor(sample_weight)
        step = tf.constant(0, tf.int64)
        epsilon = (self.epsilon_at(step) if self.epsilon_schedule is not None
                   else None)
        args = (x, y, sample_weight, self.step_seed(step, 0), epsilon)
        return xla_plan.time_modes(self._grads_and_stats, args, self.base_model.variables,
                                   rule, repeats)

    def _get_step_fn(self):
        if self._step_fn is None:
            if (getattr(self, "_jit_request", None) == "auto"
                    and not self._plan.inline):
                # set_params / switch_method may have changed the attack.
                plan = xla_plan.StepPlan(*xla_plan.resolve_xla("auto", **self._xla_facts()), False)
                plan = self._xla_measured.get(self._measure_key(), plan)
                if plan != self._plan:
                    log.info("RobustModel(%s): XLA for the per-replica step "
                             "now %s (%s)", self.method_name,
                             "on" if plan.xla else "off", plan.reason)
                    self._plan = plan
            if self.run_eagerly or self._plan.inline:
                self._step_fn = self._grads_and_stats
            else:
                self._step_fn = tf.function(self._grads_and_stats,
                                            jit_compile=self.xla,
                                            reduce_retracing=True)
        return self._step_fn

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = tf.convert_to_tensor(x)
        if x.dtype != tf.float32:
            x = tf.cast(x, tf.float32)
        context = tf.distribute.get_replica_context()
        replica_id = context.replica_id_in_sync_group if context else 0
        seed = self.step_seed(self.optimizer.iterations, replica_id)
        epsilon = None
        if self.epsilon_schedule is not None:
            epsilon = self.epsilon_at(self.optimizer.iterations)
        grads, stats = self._get_step_fn()(x, y, sample_weight, seed, epsilon)
        self.optimizer.apply(grads, self.trainable_variables)
        self._update_trackers(stats, sample_weight)
        logs = {n: self._trackers[n].result() for n in self._logged}
        if epsilon is not None:
            logs["epsilon"] = epsilon  # this step's value, not an average
        return self._step_logs(logs)

    def _update_trackers(self, stats, sample_weight):
        """Per-example values into the Mean trackers. With sample weights,
        losses are logged as Keras does (``sum(w * loss) / n``, the value
        optimised) and accuracies are weighted means."""
        w = (None if sample_weight is None
             else tf.reshape(tf.cast(sample_weight, tf.float32), [-1]))
        for key, values in stats.items():
            if w is None:
                self._trackers[key].update_state(values)
            elif key.endswith("loss"):
                self._trackers[key].update_state(values * w)
            else:
                self._trackers[key].update_state(values, w)

    def _step_logs(self, logs):
        """Keras 3.15 reduces multi-worker step logs with ``MEAN`` over axis
        0, which fails on scalars (tensorflow/tensorflow#72388): give them a
        leading axis of 1 there, so the reduction yields the scalar mean."""
        strategy = self.distribute_strategy
        if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                and strategy.extended._in_multi_worker_mode()):
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def test_step(self, data):
        """Clean loss and accuracy in inference mode (robust accuracy on held-out
        data is the evaluation callback's job)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.base_model(x, training=False)
        self._update_trackers({"loss": objectives.cross_entropy(y, logits),
                               "clean_accuracy": objectives.correct(y, logits)},
                              sample_weight)
        return self._step_logs({"loss": self._trackers["loss"].result(),
                                "clean_accuracy":
                                    self._trackers["clean_accuracy"].result()})

# Names that lived here before 0.2.0: reading one says where it is now.
MOVED = {
    'resolve_xla': 'tf_backsmooth.xla_plan.resolve_xla',
    'xla_needs_measurement': 'tf_backsmooth.xla_plan.xla_needs_measurement',
    'StepPlan': 'tf_backsmooth.xla_plan.StepPlan',
    'XLA_MARGIN': 'tf_backsmooth.xla_plan.XLA_MARGIN',
}
__getattr__ = moved.getattr_for(__name__, MOVED)
