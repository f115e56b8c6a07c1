"""``RobustModel.set_params`` / ``switch_method``: the next step is a fresh model's.

A model first trains one step with its original parameters (so its step is
traced and compiled with them), is rolled back to the starting weights and
step 0, changes its parameters or method, and trains one step again. That step
must equal (1) the hand-computed update of ``test_methods`` for the new
parameters and (2) the step of a RobustModel freshly built with them, in eager,
graph and XLA mode, and on 2 replicas (logical CPUs) with XLA on and off.
"""

import inspect

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from conftest import MODES, two_replica_strategy
from test_methods import LR, _expected_loss, _robust, _setup

from tf_backsmooth import co_guard, schedules
from tf_backsmooth.config import ConfigError

# (method and keywords of the model, the change, the fresh model's method and keywords)
CHANGES = [
    (("backward_smoothing", {}), ("set_params", {"epsilon": 0.2}),
     ("backward_smoothing", {"epsilon": 0.2})),
    (("fgsm_rs", {}), ("set_params", {"step_size": 0.05}),
     ("fgsm_rs", {"step_size": 0.05})),
    (("pgd_at", {"steps": 3, "random_start": False}),
     ("set_params", {"steps": 2, "random_start": True}), ("pgd_at", {"steps": 2})),
    (("trades", {"steps": 3, "step_size": 0.03}), ("set_params", {"epsilon": 0.15}),
     ("trades", {"steps": 3, "step_size": 0.03, "epsilon": 0.15})),
    (("fgsm_rs", {}), ("switch_method", {"name": "backward_smoothing"}),
     ("backward_smoothing", {})),
    (("backward_smoothing", {"beta": 3.0}), ("switch_method", {"name": "trades", "steps": 2}),
     ("trades", {"steps": 2, "beta": 3.0})),
    (("trades", {"steps": 2}), ("switch_method", {"name": "natural"}), ("natural", {})),
    (("natural", {}), ("switch_method", {"name": "gradalign", "epsilon": 0.1}),
     ("gradalign", {})),
]
IDS = ["bs_epsilon", "fgsm_step_size", "pgd_steps", "trades_epsilon_keeps_step",
       "fgsm_to_bs", "bs_to_trades", "trades_to_natural", "natural_to_gradalign"]


def _change(model, change):
    what, kw = change
    kw = dict(kw)
    if what == "set_params":
        return model.set_params(**kw)
    return model.switch_method(kw.pop("name"), **kw)


def _compile(model, mode):
    model.compile(optimizer=keras.optimizers.SGD(LR), run_eagerly=(mode == "eager"),
                  jit_compile=(mode == "xla"))


def _rewind(model, weights):
    """Back to the starting weights and optimizer step 0 (plain SGD has no
    other optimizer state), as the CO guard's rollback does."""
    model.base_model.set_weights(weights)
    model.optimizer.iterations.assign(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("start,change,fresh", CHANGES, ids=IDS)
def test_step_after_change_equals_fresh_model_and_hand_computation(start, change, fresh,
                                                                   mode):
    W, b, x, y = _setup()
    model = _robust(start[0], W, b, **start[1])
    _compile(model, mode)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)  # traced
    _rewind(model, [W, b])
    params = _change(model, change)
    changed = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)

    other = _robust(fresh[0], W, b, **fresh[1])
    _compile(other, mode)
    reference = other.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    assert model.method_name == fresh[0] and params == model.params == other.params
    assert set(changed.history) == set(reference.history)
    for a, c in zip(model.base_model.get_weights(), other.base_model.get_weights()):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-7)
    np.testing.assert_allclose(changed.history["loss"], reference.history["loss"],
                               rtol=1e-6)

    # The update by hand (test_methods): float64 loss, central differences.
    loss_fn = _expected_loss(fresh[0], params, W, b, x, y)
    W64, b64 = W.astype(np.float64), b.astype(np.float64)
    gW, gb = ref.numeric_grad(loss_fn, [W64, b64])
    new_W, new_b = model.base_model.get_weights()
    np.testing.assert_allclose(new_W, W64 - LR * gW, atol=2e-5)
    np.testing.assert_allclose(new_b, b64 - LR * gb, atol=2e-5)


def _two_replica_fit(model, x, y):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
    return model.fit(ds, epochs=1, verbose=0)


@pytest.mark.slow
@pytest.mark.multi_device
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("start,change,fresh", [CHANGES[2], CHANGES[4]],
                         ids=[IDS[2], IDS[4]])
def test_step_after_change_equals_fresh_model_on_two_replicas(start, change, fresh, jit):
    strategy = two_replica_strategy()
    W, b, x, y = _setup()
    with strategy.scope():
        model = _robust(start[0], W, b, **start[1])
        _compile(model, "xla" if jit else "graph")
    assert model.distribute_strategy.num_replicas_in_sync == 2 and model.xla == jit
    _two_replica_fit(model, x, y)
    _rewind(model, [W, b])
    _change(model, change)
    changed = _two_replica_fit(model, x, y)
    with strategy.scope():
        other = _robust(fresh[0], W, b, **fresh[1])
        _compile(other, "xla" if jit else "graph")
    reference = _two_replica_fit(other, x, y)
    assert model.params == other.params
    for a, c in zip(model.base_model.get_weights(), other.base_model.get_weights()):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-7)
    assert not np.allclose(model.base_model.get_weights()[0], W)
    np.testing.assert_allclose(changed.history["loss"], reference.history["loss"],
                               rtol=1e-6)


def test_set_params_keeps_given_keywords_and_follows_epsilon_for_defaults():
    W, b, _, _ = _setup()
    model = _robust("pgd_at", W, b, step_size=0.02)
    p = model.set_params(epsilon=0.2)
    assert (p.epsilon, p.step_size, p.steps) == (0.2, 0.02, 10)  # step size was given
    p = model.set_params(step_size=None)                         # back to the default
    assert p.step_size == pytest.approx(2.5 * 0.2 / 10)
    bs = _robust("backward_smoothing", W, b)
    assert bs.set_params(epsilon=0.2).step_size == 0.2           # BS default alpha = eps


def test_bad_values_raise_and_change_nothing():
    W, b, _, _ = _setup()
    model = _robust("fgsm_rs", W, b)
    before = model.params
    for kw, name in [({"epsilon": 2.0}, "epsilon"), ({"step_size": -1.0}, "step_size"),
                     ({"steps": 3}, "steps"), ({"lambda_": 0.1}, "lambda_")]:
        with pytest.raises(ConfigError, match=name):
            model.set_params(**kw)
        assert model.params == before and model.method_name == "fgsm_rs"
    with pytest.raises(ConfigError, match="unknown method"):
        model.switch_method("nope")
    with pytest.raises(ConfigError, match="unknown keyword"):
        model.switch_method("trades", lambda_=0.1)
    assert model.params == before and model.method_name == "fgsm_rs"
    warm = _robust("fgsm_rs", W, b, epsilon_schedule=schedules.EpsilonWarmup(0.1, 4))
    with pytest.raises(ConfigError, match="epsilon_schedule"):
        warm.switch_method("natural")
    assert warm.method_name == "fgsm_rs"


def test_change_before_compile_and_one_trace_after():
    """Without a train function yet nothing is retraced; after a change the
    new step is traced once (XLA) and the logged metrics follow the method."""
    W, b, x, y = _setup()
    model = _robust("natural", W, b)
    model.switch_method("fgsm_rs", epsilon=0.1)
    _compile(model, "xla")
    logs = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    assert "adv_accuracy" in logs
    assert model._get_step_fn().experimental_get_tracing_count() == 1
    model.switch_method("natural")
    logs = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    assert "adv_accuracy" not in logs
    assert model._get_step_fn().experimental_get_tracing_count() == 1


def test_co_guard_uses_only_the_public_api():
    source = inspect.getsource(co_guard)
    for private in ("._step_fn", "._logged", "make_train_function", "model.params =",
                    "model.method ="):
        assert private not in source
