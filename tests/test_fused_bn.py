"""Training-mode BatchNorm fused into one kernel (tf_backsmooth.fused_bn)."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import MODES, run_in_mode, two_replica_strategy

from tf_backsmooth import fused_bn
from tf_backsmooth import run_dir as run_dir_lib
from tf_backsmooth.robust_model import RobustModel

EPS = 1e-5
MOMENTUM = 0.9


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    monkeypatch.setattr(fused_bn, "ENABLED", True)


def _layer(channels=3, **kw):
    layer = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS, **kw)
    layer.build((None, 5, 4, channels))
    rs = np.random.RandomState(1)
    layer.set_weights([(rs.rand(channels) + 0.5).astype(np.float32),   # gamma
                       rs.randn(channels).astype(np.float32),          # beta
                       rs.randn(channels).astype(np.float32),          # moving mean
                       (rs.rand(channels) + 0.5).astype(np.float32)])  # moving variance
    return layer


def _hand(x, dy, gamma, beta, moving_mean, moving_var):
    """Batch normalisation in float64 NumPy: output, d(sum(y * dy))/d(x, gamma,
    beta), and the moving statistics after one update (biased variance)."""
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = x.mean((0, 1, 2))
    var = ((x - mean) ** 2).mean((0, 1, 2))
    inv = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean) * inv
    y = gamma * xhat + beta
    dxhat = dy * gamma
    dx = inv / n * (n * dxhat - dxhat.sum((0, 1, 2)) - xhat * (dxhat * xhat).sum((0, 1, 2)))
    return (y, dx, (dy * xhat).sum((0, 1, 2)), dy.sum((0, 1, 2)),
            MOMENTUM * moving_mean + (1 - MOMENTUM) * mean,
            MOMENTUM * moving_var + (1 - MOMENTUM) * var)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [2, 1])
def test_fused_training_call_equals_the_hand_computation(mode, batch):
    """Output, the three gradients and both moving-average updates, against
    float64 NumPy (batch 1 with 1x1 maps: n = 1, the variance's n - 1 case)."""
    layer = _layer()
    shape = (batch, 5, 4, 3) if batch == 2 else (1, 1, 1, 3)
    rs = np.random.RandomState(0)
    x = (rs.randn(*shape) * 2 + 1).astype(np.float32)
    dy = rs.randn(*shape).astype(np.float32)
    gamma, beta, moving_mean, moving_var = [w.astype(np.float64) for w in layer.get_weights()]
    want = _hand(x.astype(np.float64), dy.astype(np.float64), gamma, beta, moving_mean, moving_var)

    def step():
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = fused_bn.fused_training_call(layer, xt)
            loss = tf.reduce_sum(y * dy)
        return (y,) + tuple(tape.gradient(loss, [xt, layer.gamma, layer.beta]))

    got = [t.numpy() for t in run_in_mode(step, mode)]
    ops = tf.function(step).get_concrete_function().graph.get_operations()
    assert "FusedBatchNormV3" in {op.type for op in ops}
    layer.set_weights([gamma, beta, moving_mean, moving_var])  # the traced call updated them
    run_in_mode(step, mode)
    for g, w in zip(got, want[:4]):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), want[4], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), want[5], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_fused_training_call_in_bfloat16_equals_keras_mixed_precision(mode):
    """Under "mixed_bfloat16" the kernel takes the bfloat16 input with float32
    statistics, scale and offset: the output and input gradient (bfloat16)
    equal Keras' upcast-normalise-downcast to within one bfloat16 rounding,
    the scale and offset gradients and the moving statistics (float32) to
    float32 rounding."""
    rs = np.random.RandomState(0)
    x = tf.cast((rs.randn(2, 5, 4, 3) * 2 + 1).astype(np.float32), tf.bfloat16)
    dy = tf.constant(rs.randn(2, 5, 4, 3).astype(np.float32))
    out = {}
    for fused in (True, False):
        layer = _layer(dtype="mixed_bfloat16")

        def step(layer=layer, fused=fused):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = (fused_bn.fused_training_call(layer, x) if fused
                     else fused_bn._KERAS_CALL(layer, x, training=True))
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
            return (y,) + tuple(tape.gradient(loss, [x, layer.gamma, layer.beta]))

        got = run_in_mode(step, mode)
        assert [t.dtype for t in got] == [tf.bfloat16, tf.bfloat16, tf.float32, tf.float32]
        out[fused] = [tf.cast(t, tf.float32).numpy() for t in got] + [
            layer.moving_mean.numpy(), layer.moving_variance.numpy()]
        if fused:
            assert "FusedBatchNormV3" in _traced_types(step)
    for i, (a, b) in enumerate(zip(out[True], out[False])):
        tol = 2 ** -7 if i < 2 else 1e-5  # bfloat16 has 8 significant bits
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def _traced_types(fn, *args):
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()}


def test_override_fuses_only_eligible_training_calls_and_restores_the_layer():
    x = tf.zeros([2, 5, 4, 3])
    layer = _layer()
    model = keras.Sequential([keras.Input((5, 4, 3)), layer])
    with fused_bn.training_override(model):
        assert "call" in layer.__dict__
        fused = _traced_types(lambda t: model(t, training=True), x)
        inference = _traced_types(lambda t: model(t, training=False), x)
    assert "call" not in layer.__dict__  # Keras' own method again
    assert "FusedBatchNormV3" in fused
    assert "FusedBatchNormV3" not in inference
    assert "FusedBatchNormV3" not in _traced_types(lambda t: model(t, training=True), x)

    class Custom(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=training, mask=mask)

    not_eligible = [Custom(), keras.layers.BatchNormalization(synchronized=True),
                    keras.layers.BatchNormalization(center=False),
                    keras.layers.BatchNormalization(renorm=True)]
    for bn in not_eligible:
        assert not fused_bn.eligible(bn), bn
    # bfloat16 inputs of a "mixed_bfloat16" layer are fused too; float16 ones
    # (not measured) fall back.
    for policy, fuses in (("mixed_bfloat16", True), ("mixed_float16", False)):
        mixed = keras.Sequential([keras.Input((5, 4, 3)), _layer(dtype=policy)])
        with fused_bn.training_override(mixed):
            types = _traced_types(lambda t, m=mixed: m(t, training=True), x)
        assert ("FusedBatchNormV3" in types) == fuses, policy
    # Eligible layers whose inputs are not 4-D float32 fall back at call time.
    dense_bn = keras.Sequential([keras.Input((6,)), keras.layers.BatchNormalization()])
    assert fused_bn.layers_of(dense_bn)
    with fused_bn.training_override(dense_bn):
        types = _traced_types(lambda t: dense_bn(t, training=True), tf.zeros([4, 6]))
    assert "FusedBatchNormV3" not in types
    frozen = _layer()
    frozen.trainable = False  # training=True then means inference statistics
    with fused_bn.training_override(keras.Sequential([keras.Input((5, 4, 3)), frozen])):
        assert "FusedBatchNormV3" not in _traced_types(lambda t: frozen(t, training=True), x)


def test_override_is_reentrant_across_threads_and_off_when_disabled(monkeypatch):
    layer = _layer()
    model = keras.Sequential([keras.Input((5, 4, 3)), layer])
    inside, first_left = threading.Barrier(2), threading.Event()
    seen = []

    def first():
        with fused_bn.training_override(model):
            inside.wait()
        first_left.set()

    def second():
        with fused_bn.training_override(model):
            inside.wait()
            first_left.wait(10)
            seen.append("call" in layer.__dict__)  # still held by this thread

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert first_left.is_set() and seen == [True] and "call" not in layer.__dict__
    with fused_bn.training_override(model):
        with fused_bn.training_override(model):
            pass
        assert "call" in layer.__dict__
    assert "call" not in layer.__dict__
    monkeypatch.setattr(fused_bn, "ENABLED", False)
    with fused_bn.training_override(model):
        assert "call" not in layer.__dict__
    assert fused_bn.describe().startswith("keras (unfused")
    monkeypatch.setattr(fused_bn, "ENABLED", "auto")
    monkeypatch.setattr(fused_bn.fastgrad, "accelerator", lambda: "GPU")
    assert not fused_bn.enabled()


def _bn_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3)])


def _fit(method, jit, fused, monkeypatch, strategy=None, **kw):
    monkeypatch.setattr(fused_bn, "ENABLED", fused)
    rs = np.random.RandomState(0)
    x = rs.rand(32, 8, 8, 1).astype(np.float32)
    y = rs.randint(0, 3, 32)
    with (strategy or tf.distribute.get_strategy()).scope():
        base = _bn_model()
        model = RobustModel(base, method=method, seed=0, **kw)
        model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9), jit_compile=jit)
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
    if strategy is not None:
        return model, None
    graph = model._get_step_fn().get_concrete_function(
        tf.TensorSpec([16, 8, 8, 1]), tf.TensorSpec([16], tf.int64), None,
        tf.TensorSpec([2], tf.int32), None).graph
    return model, {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("method,kw", [
    ("backward_smoothing", {"epsilon": 0.1}),
    ("fgsm_rs", {"epsilon": 0.1, "attack_training": True}),  # attack in training mode
])
def test_training_step_equals_keras_batchnorm(method, kw, jit, monkeypatch):
    """Two steps with the fused kernel and two with Keras' ops: the same
    weights and moving statistics; the layers stay Keras' own class."""
    fused, fused_types = _fit(method, jit, True, monkeypatch, **kw)
    keras_bn, keras_types = _fit(method, jit, False, monkeypatch, **kw)
    assert fused.xla == jit
    assert "FusedBatchNormV3" in fused_types and "FusedBatchNormV3" not in keras_types
    for a, b in zip(fused.base_model.get_weights(), keras_bn.base_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert all("call" not in layer.__dict__ for layer in fused.base_model.layers)
    assert type(fused.base_model.layers[1]) is keras.layers.BatchNormalization


@pytest.mark.parametrize("jit", [False, True])
def test_mixed_bfloat16_training_step_fuses_and_equals_keras_batchnorm(jit, monkeypatch):
    """The same two Backward Smoothing steps as above, built under the
    "mixed_bfloat16" policy (bin/train --dtype_policy): the step's
    training-mode BatchNorm runs the fused kernel on bfloat16, and its weights
    are as close to Keras' bfloat16 BatchNorm as bfloat16 rounding moves
    Keras' own: no further from them than Keras' float32 weights are."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        fused, fused_types = _fit("backward_smoothing", jit, True, monkeypatch, epsilon=0.1)
        keras_bn, keras_types = _fit("backward_smoothing", jit, False, monkeypatch, epsilon=0.1)
    finally:
        keras.config.set_dtype_policy(previous)
    full, _ = _fit("backward_smoothing", jit, False, monkeypatch, epsilon=0.1)
    assert fused.base_model.layers[1].compute_dtype == "bfloat16"
    assert full.base_model.layers[1].compute_dtype == "float32"
    assert "FusedBatchNormV3" in fused_types and "FusedBatchNormV3" not in keras_types

    def distance(m1, m2):
        return sum(float(np.linalg.norm(a - b)) for a, b in
                   zip(m1.base_model.get_weights(), m2.base_model.get_weights()))

    rounding = distance(keras_bn, full)
    assert 0 < distance(fused, keras_bn) <= rounding


@pytest.mark.slow
@pytest.mark.multi_device
def test_two_replicas_fused_equal_two_replicas_keras(monkeypatch):
    """Under MirroredStrategy each replica normalises with its own batch and
    updates the mirrored moving statistics: fused as Keras does."""
    strategy = two_replica_strategy()
    fused, _ = _fit("backward_smoothing", False, True, monkeypatch, strategy, epsilon=0.1)
    keras_bn, _ = _fit("backward_smoothing", False, False, monkeypatch, strategy, epsilon=0.1)
    assert fused.distribute_strategy.num_replicas_in_sync == 2
    for a, b in zip(fused.base_model.get_weights(), keras_bn.base_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    bn = fused.base_model.layers[1]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)


def test_run_manifest_says_how_training_batchnorm_ran(monkeypatch):
    from tf_backsmooth import config as config_lib

    model = RobustModel(_bn_model(), epsilon=0.1)
    config = config_lib.TrainConfig()
    entry = run_dir_lib.manifest(config, model, "default", 1)["training_batchnorm"]
    assert entry.startswith("fused (FusedBatchNormV3)")
    monkeypatch.setattr(fused_bn, "ENABLED", False)
    entry = run_dir_lib.manifest(config, model, "default", 1)["training_batchnorm"]
    assert entry == "keras (unfused: fused_bn.ENABLED is False)"


def test_a_call_set_on_the_instance_by_someone_else_is_left_alone():
    layer = _layer()
    model = keras.Sequential([keras.Input((5, 4, 3)), layer])
    seen = []

    def spy(inputs, training=None, **kw):
        seen.append(training)
        return keras.layers.BatchNormalization.call(layer, inputs, training=training, **kw)

    layer.call = spy
    assert not fused_bn.layers_of(model)
    with fused_bn.training_override(model):
        assert layer.__dict__["call"] is spy
        model(tf.zeros([2, 5, 4, 3]), training=True)
    assert layer.__dict__["call"] is spy and seen == [True]
