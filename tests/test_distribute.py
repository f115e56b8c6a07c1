"""1 device vs 2 replicas (logical CPUs): same update, same logged loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import two_replica_strategy

from tf_backsmooth import distribute, schedules
from tf_backsmooth.robust_model import RobustModel

pytestmark = pytest.mark.multi_device

GLOBAL_BATCH = 16


def _fit(strategy, method, jit, batchnorm=False, **kw):
    rs = np.random.RandomState(0)
    x = rs.rand(GLOBAL_BATCH * 2, 8, 8, 1).astype(np.float32)
    y = rs.randint(0, 3, GLOBAL_BATCH * 2)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3)]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers += [keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3)]
        base = keras.Sequential(layers)
        model = RobustModel(base, method=method, seed=0, **kw)
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=jit)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    history = model.fit(ds, epochs=1, verbose=0).history
    return model, history


def _two():
    return two_replica_strategy()


@pytest.mark.slow  # two fits per case, compiled under a 2-replica strategy
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method,kw", [
    ("natural", {}),
    ("pgd_at", {"epsilon": 0.1, "steps": 3, "random_start": False}),
    ("fgsm_rs", {"epsilon": 0.1, "random_start": False}),
    # Epsilon warm-up: a different epsilon at each of the two steps.
    ("pgd_at", {"epsilon": 0.1, "steps": 3, "random_start": False,
                "epsilon_schedule": schedules.EpsilonWarmup(0.1, 2)}),
    ("fgsm_rs", {"epsilon": 0.1, "random_start": False,
                 "epsilon_schedule": schedules.EpsilonWarmup(0.1, 3)}),
], ids=["natural", "pgd_at", "fgsm_rs", "pgd_at_warmup", "fgsm_rs_warmup"])
def test_two_replicas_match_one_device(method, kw, jit):
    one, h1 = _fit(tf.distribute.get_strategy(), method, jit, **kw)
    two, h2 = _fit(_two(), method, jit, **kw)
    assert two.distribute_strategy.num_replicas_in_sync == 2
    assert two.xla == jit
    for a, b in zip(one.get_weights(), two.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert h1["loss"][0] == pytest.approx(h2["loss"][0], rel=1e-5)
    assert h1["clean_accuracy"][0] == pytest.approx(h2["clean_accuracy"][0])
    if "epsilon_schedule" in kw:
        assert h1["epsilon"][0] == pytest.approx(h2["epsilon"][0])


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_backward_smoothing_with_batchnorm_trains_under_mirrored(jit):
    model, h = _fit(_two(), "backward_smoothing", jit, batchnorm=True, epsilon=0.1)
    assert np.isfinite(h["loss"][0])
    bn = [ln for ln in model.base_model.layers if isinstance(ln, keras.layers.BatchNormalization)][0]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)  # statistics were updated


def test_replicas_draw_different_noise():
    strategy = _two()
    model = RobustModel(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]), epsilon=0.1)

    def per_replica():
        ctx = tf.distribute.get_replica_context()
        return model.step_seed(tf.constant(3), ctx.replica_id_in_sync_group)

    seeds = strategy.experimental_local_results(strategy.run(per_replica))
    assert len(seeds) == 2 and not np.array_equal(seeds[0].numpy(), seeds[1].numpy())


def test_get_strategy_mirrored_on_logical_cpus():
    # conftest already split the CPU in two; asking for 2 reuses them.
    strategy = distribute.get_strategy("mirrored", num_cpu_devices=2)
    assert strategy.num_replicas_in_sync == 2
    with pytest.raises(distribute.StrategyError, match="already initialised"):
        distribute.get_strategy("mirrored", num_cpu_devices=3)


def test_batch_size_must_divide_replicas():
    with pytest.raises(distribute.StrategyError, match="divisible"):
        distribute.check_batch_size(15, 2)
    with pytest.raises(distribute.StrategyError, match="TF_CONFIG"):
        import os
        os.environ.pop("TF_CONFIG", None)
        distribute.get_strategy("multi_worker")
