"""Epsilon schedules: values per step, logging, one trace, validation."""

import keras
import numpy as np
import pytest

from tf_backsmooth import config as config_lib
from tf_backsmooth import schedules
from tf_backsmooth.robust_model import RobustModel


def test_linear_warmup_values():
    s = schedules.EpsilonWarmup(0.3, 4)
    got = [float(s(t)) for t in range(7)]
    np.testing.assert_allclose(got, [0.075, 0.15, 0.225, 0.3, 0.3, 0.3, 0.3], rtol=1e-6)
    assert float(schedules.EpsilonWarmup(0.3, 0)(0)) == pytest.approx(0.3)
    assert schedules.EpsilonWarmup(0.3, 4).get_config() == {"epsilon": 0.3, "warmup_steps": 4}


def test_warmup_steps_from_epochs():
    assert schedules.warmup_steps(1.5, 100) == 150
    assert schedules.warmup_steps(0.0, 100) == 0
    assert schedules.warmup_steps(0.333, 3) == 1
    with pytest.raises(ValueError, match="epsilon_warmup_epochs"):
        schedules.warmup_steps(-1, 100)


def _data(n=48):
    rs = np.random.RandomState(0)
    return rs.rand(n, 6).astype(np.float32), rs.randint(0, 3, n)


def _model(schedule, method="pgd_at", **kw):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(3)])
    kw.setdefault("epsilon", 0.2)
    return RobustModel(base, method=method, epsilon_schedule=schedule, **kw)


class _PerBatch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.eps = []

    def on_train_batch_end(self, batch, logs=None):
        self.eps.append(float(logs["epsilon"]))


@pytest.mark.parametrize("jit", [False, True])
def test_epsilon_changes_every_step_and_the_step_is_traced_once(jit):
    x, y = _data()
    model = _model(schedules.EpsilonWarmup(0.2, 5), steps=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
    cb = _PerBatch()
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    expected = [0.2 * min(1.0, (t + 1) / 5) for t in range(12)]
    np.testing.assert_allclose(cb.eps, expected, rtol=1e-6)
    # The epoch log holds the last step's value (what TensorBoard/metrics.jsonl get).
    np.testing.assert_allclose(history.history["epsilon"], [0.2, 0.2], rtol=1e-6)
    assert model._get_step_fn().experimental_get_tracing_count() == 1
    assert model.xla == jit


def test_any_callable_or_keras_schedule_is_accepted():
    x, y = _data(16)
    poly = keras.optimizers.schedules.PolynomialDecay(0.0, 4, end_learning_rate=0.1)
    for schedule, first in ((lambda step: 0.05, 0.05), (poly, 0.0)):
        model = _model(schedule, method="fgsm_rs", epsilon=0.1)
        model.compile(optimizer="sgd")
        cb = _PerBatch()
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[cb])
        assert cb.eps[0] == pytest.approx(first)
        assert float(model.epsilon_at(2)) == pytest.approx(float(schedule(2)))


def test_epsilon_zero_step_is_natural_training_on_x():
    """At epsilon 0 the attack returns x itself: the update equals training on
    clean inputs with the same (adversarial-CE) objective."""
    x, y = _data(8)
    a = _model(lambda step: 0.0, method="pgd_at", epsilon=0.2, steps=3)
    b = _model(None, method="natural", epsilon=None)
    for m in (a, b):
        m.compile(optimizer=keras.optimizers.SGD(0.5))
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, atol=1e-6)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="epsilon_schedule"):
        _model(0.1)
    with pytest.raises(ValueError, match="runs no attack"):
        _model(schedules.EpsilonWarmup(0.1, 3), method="natural", epsilon=None)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.EpsilonWarmup(0.1, -1)


@pytest.mark.parametrize("value", [-0.5, 11.0, float("nan")])
def test_config_checks_warmup_epochs(value):
    with pytest.raises(config_lib.ConfigError, match="epsilon_warmup_epochs"):
        config_lib.TrainConfig(epochs=10, epsilon_warmup_epochs=value)
    with pytest.raises(config_lib.ConfigError, match="natural"):
        config_lib.TrainConfig(method="natural", epsilon_warmup_epochs=1.0)


def _lr_at(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_piecewise_default_divides_by_ten_at_half_and_three_quarters():

    config = config_lib.TrainConfig(epochs=4, lr=1.0, lr_schedule="piecewise")
    schedule = schedules.learning_rate(config, steps_per_epoch=10)  # 40 steps
    # PiecewiseConstantDecay: values[i] while step <= boundaries[i].
    assert _lr_at(schedule, [0, 20, 21, 30, 31, 39]) == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_piecewise_boundaries_are_epochs():

    config = config_lib.TrainConfig(epochs=4, lr=1e-3, lr_schedule="piecewise",
                                    lr_boundaries=[2.5])
    assert config.lr_boundaries == (2.5,)
    schedule = schedules.learning_rate(config, steps_per_epoch=10)
    assert _lr_at(schedule, [0, 25, 26, 39]) == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4])
    three = config_lib.TrainConfig(epochs=4, lr=1.0, lr_boundaries=(1, 2.0, 2.04))
    # 2.0 and 2.04 epochs both round to step 20: the second moves to step 21.
    schedule = schedules.learning_rate(three, steps_per_epoch=10)
    assert _lr_at(schedule, [10, 11, 20, 21, 22]) == pytest.approx(
        [1.0, 0.1, 0.1, 0.01, 0.001])


@pytest.mark.parametrize("boundaries,match", [
    ((0.0,), "lr_boundaries must be >"), ((4.0,), "lr_boundaries must be <"),
    ((2.0, 1.0), "strictly increasing"), ((1.0, 1.0), "strictly increasing"),
    ("2.5", "list of epochs"), ((float("nan"),), "finite"),
])
def test_config_checks_lr_boundaries(boundaries, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.TrainConfig(epochs=4, lr_boundaries=boundaries)


def test_lr_boundaries_need_the_piecewise_schedule():
    with pytest.raises(config_lib.ConfigError, match="piecewise"):
        config_lib.TrainConfig(epochs=4, lr_schedule="cyclic", lr_boundaries=(2,))
    assert config_lib.TrainConfig(epochs=4, lr_schedule="cyclic").lr_boundaries == ()
