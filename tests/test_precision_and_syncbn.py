"""Mixed precision and synchronised BatchNorm."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import two_replica_strategy

from tf_backsmooth import attacks
from tf_backsmooth.robust_model import RobustModel

pytestmark = pytest.mark.multi_device


@pytest.fixture
def policy():
    previous = keras.config.dtype_policy()
    yield lambda name: keras.config.set_dtype_policy(name)
    keras.config.set_dtype_policy(previous)


def _data(n=32, shape=(8, 8, 1)):
    rs = np.random.RandomState(0)
    return rs.rand(n, *shape).astype(np.float32), rs.randint(0, 3, n)


@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(policy, name):
    policy(name)
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.Flatten(), keras.layers.Dense(3)])
    assert base.layers[-1].compute_dtype != "float32"
    model = RobustModel(base, epsilon=0.1)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    if name == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [w.copy() for w in base.get_weights()]
    x, y = _data()
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0]) and logs["robust_loss"][0] > 0
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, base.get_weights()))


def test_float16_attack_gradient_does_not_underflow(policy):
    """A float16 model whose input gradient is ~1e-9 per pixel: unscaled, the
    gradient underflows to 0 and the attack would not move."""
    policy("mixed_float16")
    base = keras.Sequential([keras.Input((16,)), keras.layers.Dense(3, kernel_initializer="ones")])
    x = np.full((4, 16), 0.5, np.float32)
    y = np.zeros(4, np.int64)
    w = np.zeros((16, 3), np.float32)
    w[:, 1] = 1e-6  # tiny logit slope: input gradient ~7e-9, below float16
    base.set_weights([w, np.array([5.0, 0.0, 0.0], np.float32)])
    f = lambda t: base(t)  # noqa: E731
    x_adv = attacks.fgsm(f, x, y, 0.1).numpy()
    assert np.all(np.abs(x_adv - x) > 0.09)
    attacks_scale = attacks.FLOAT16_INPUT_GRAD_SCALE
    try:
        attacks.FLOAT16_INPUT_GRAD_SCALE = 1.0
        unscaled = attacks.fgsm(f, x, y, 0.1).numpy()
    finally:
        attacks.FLOAT16_INPUT_GRAD_SCALE = attacks_scale
    assert np.allclose(unscaled, x)  # the failure mode the scale prevents


def _bn_fit(strategy, synchronized):
    x, y = _data(32)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
                                 keras.layers.BatchNormalization(synchronized=synchronized),
                                 keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3)])
        model = RobustModel(base, method="pgd_at", epsilon=0.1, steps=2, random_start=False)
        model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=True)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
    return model


@pytest.mark.slow
def test_sync_batchnorm_two_replicas_match_one_device():
    one = _bn_fit(tf.distribute.get_strategy(), False)
    synced = _bn_fit(two_replica_strategy(), True)
    local = _bn_fit(two_replica_strategy(), False)
    assert synced.xla is False and synced.xla_reason == "synchronized BatchNorm"
    for a, b in zip(one.get_weights(), synced.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # Without synchronisation the per-replica statistics change the update.
    assert max(np.abs(a - b).max() for a, b in zip(one.get_weights(), local.get_weights())) > 1e-3
