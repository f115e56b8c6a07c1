"""A run's model and optimizer, built from its :class:`~tf_backsmooth.config.TrainConfig`.

:func:`build_model` makes the classifier (:func:`make_classifier`) and wraps it
in a :class:`~tf_backsmooth.robust_model.RobustModel` with the method, its
parameters and the epsilon warm-up; :func:`make_optimizer` the optimizer with
the learning-rate schedule; :func:`export_classifier` the float32 classifier
that is evaluated and saved. No absl flags are read here.
"""

from __future__ import annotations

from tf_backsmooth import schedules


def make_optimizer(config, steps_per_epoch):
    import keras

    schedule = schedules.learning_rate(config, steps_per_epoch)
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
