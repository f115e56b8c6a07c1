"""Schedules: epsilon (the attack budget) and the learning rate, per training step.

:func:`learning_rate` builds a run's learning-rate schedule from its config.

A schedule is any callable ``step -> epsilon`` (pixel units) that accepts an
int64/float tensor ``step`` (the optimizer's ``iterations`` before the update)
and returns a scalar; a ``keras.optimizers.schedules.LearningRateSchedule`` is
one. :class:`~tf_backsmooth.robust_model.RobustModel` evaluates it once per
step, outside the compiled per-replica function, and scales every step size of
the method by ``epsilon(step) / epsilon`` (so the ratio step size / epsilon is
the method's at every step). Epsilon is a tensor inside the step: the step is
traced once, whatever the schedule.

:class:`EpsilonWarmup` is the linear warm-up that ``bin/train
--epsilon_warmup_epochs`` uses.
"""

from __future__ import annotations

import keras

from tf_backsmooth.config import ConfigError, check_epsilon, check_int, check_real


@keras.saving.register_keras_serializable("tf_backsmooth")
class EpsilonWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up of epsilon: ``epsilon * min(1, (step + 1) / warmup_steps)``.

    Step ``t`` (0-based, the optimizer's iteration count before the update)
    trains at ``epsilon * (t + 1) / warmup_steps`` until step
    ``warmup_steps - 1``, which is the first at the full ``epsilon``; so no
    step is spent at epsilon 0. ``warmup_steps=0`` is a constant ``epsilon``.
    """

    def __init__(self, epsilon, warmup_steps):
        self.epsilon = check_epsilon(epsilon, allow_zero=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)

    def __call__(self, step):
        eps = keras.ops.convert_to_tensor(self.epsilon, "float32")
        if self.warmup_steps == 0:
            return eps
        step = keras.ops.cast(step, "float32")
        frac = keras.ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return eps * frac

    def get_config(self):
        return {"epsilon": self.epsilon, "warmup_steps": self.warmup_steps}


def warmup_steps(epochs, steps_per_epoch):
    """Steps of a warm-up over ``epochs`` (a float) epochs, rounded."""
    epochs = check_real("epsilon_warmup_epochs", epochs, low=0.0)
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return int(round(epochs * steps_per_epoch))


def check_schedule(schedule):
    """Raises ConfigError unless ``schedule`` is None or callable."""
    if schedule is not None and not callable(schedule):
        raise ConfigError(
            "epsilon_schedule must be a callable step -> epsilon (e.g. a "
            "keras LearningRateSchedule or tf_backsmooth.schedules."
            f"EpsilonWarmup), got {schedule!r}")
    return schedule


# ------------------------------------------------------------ learning rate
def learning_rate(config, steps_per_epoch):
    """The learning rate of a run (``config.lr``, ``lr_schedule``, ``lr_boundaries``,
    ``epochs``): a float, or a Keras schedule of the optimizer step."""
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
