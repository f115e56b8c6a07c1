"""The fast input gradient of few-channel convolutions (tf_backsmooth.fastgrad)."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import ops

from tf_backsmooth import attacks, fastgrad, fused_bn, objectives


def _numpy_input_grad(dy, kernel, input_hw, strides, padding):
    """The input gradient by the definition: scatter every tap (float64 loops)."""
    b, ho, wo, co = dy.shape
    kh, kw, ci, _ = kernel.shape
    (h, w), (sh, sw) = input_hw, strides
    if padding == "SAME":
        top = max((ho - 1) * sh + kh - h, 0) // 2
        left = max((wo - 1) * sw + kw - w, 0) // 2
    else:
        top = left = 0
    dx = np.zeros((b, h, w, ci))
    for i in range(ho):
        for j in range(wo):
            for p in range(kh):
                for q in range(kw):
                    r, c = sh * i + p - top, sw * j + q - left
                    if 0 <= r < h and 0 <= c < w:
                        dx[:, r, c, :] += dy[:, i, j, :] @ kernel[p, q].T
    return dx


CASES = [  # (H, W, C_in, C_out, kernel, stride, padding)
    (7, 7, 1, 3, 3, 1, "VALID"),
    (7, 8, 1, 4, 3, 1, "SAME"),
    (9, 9, 3, 2, 4, 2, "VALID"),   # mnist_cnn's layout (after ZeroPadding2D)
    (8, 9, 2, 3, 4, 2, "SAME"),    # even kernel, asymmetric SAME padding
    (10, 11, 1, 2, 5, 3, "VALID"),  # rows past the last window get no gradient
    (6, 7, 3, 2, 1, 2, "SAME"),    # 1x1 kernel: phases without taps
    (5, 5, 2, 2, 2, 3, "VALID"),   # kernel smaller than the stride
]


@pytest.mark.parametrize("h,w,ci,co,k,s,padding", CASES)
def test_conv2d_input_grad_is_the_scatter_of_every_tap(h, w, ci, co, k, s, padding):
    rs = np.random.RandomState(h * 100 + k * 10 + s)
    x = rs.randn(2, h, w, ci)
    kernel = rs.randn(k, k, ci, co)
    y = tf.nn.conv2d(tf.constant(x), tf.constant(kernel), s, padding)
    dy = rs.randn(*y.shape)
    want = _numpy_input_grad(dy, kernel, (h, w), (s, s), padding)
    got = fastgrad.conv2d_input_grad(tf.constant(dy), tf.constant(kernel), (h, w),
                                     (s, s), padding).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # and TensorFlow's own kernel agrees with the NumPy definition
    tf_grad = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=x.shape, filter=kernel, out_backprop=dy, strides=[1, s, s, 1],
        padding=padding).numpy()
    np.testing.assert_allclose(tf_grad, want, rtol=1e-10, atol=1e-10)


def _conv_model(ci, filters=6):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, ci))
    z = keras.layers.ZeroPadding2D(1)(inputs)
    z = keras.layers.Conv2D(filters, 4, strides=2, activation="relu")(z)  # fast path
    z = keras.layers.Conv2D(20, 3, padding="same", activation="relu")(z)
    z = keras.layers.Conv2D(4, 3, activation="relu")(z)  # 20 input channels: TF's
    z = keras.layers.Flatten()(z)
    return keras.Model(inputs, keras.layers.Dense(5)(z))


def _registered():
    return ops._gradient_registry.lookup("Conv2D")  # pylint: disable=protected-access


@pytest.fixture
def forced_on(monkeypatch):
    """The override on whatever the CPU rule says (it is off under TensorFlow's
    Eigen kernels, where these tests also run: tests/test_cpu.py)."""
    monkeypatch.setattr(fastgrad, "ENABLED", True)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_attack_gradients_equal_tensorflows_and_the_override_is_scoped(mode, forced_on):
    model = _conv_model(1)
    rs = np.random.RandomState(0)
    x = tf.constant(rs.rand(8, 12, 12, 1).astype(np.float32))
    y = tf.constant(rs.randint(0, 5, 8))

    def grad(z):
        return attacks.input_gradient(lambda t: model(t, training=False), z,
                                      lambda logits: objectives.cross_entropy(y, logits))[1]

    if mode != "eager":
        grad_fn = tf.function(grad, jit_compile=(mode == "xla"))
    else:
        grad_fn = grad
    before = _registered()
    fastgrad._COMPILED.clear()
    got = grad_fn(x).numpy()
    assert _registered() is before  # restored on leaving
    assert fastgrad.override_status() == "on"
    # the first convolution (1 input channel) took the fast path, only it
    assert [k[:3] for k in fastgrad._COMPILED] == [((12 + 2, 12 + 2), (2, 2), "VALID")]
    with tf.GradientTape() as tape:  # TensorFlow's gradient, no override
        tape.watch(x)
        loss = tf.reduce_sum(objectives.cross_entropy(y, model(x, training=False)))
    want = tape.gradient(loss, x).numpy()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_override_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(fastgrad, "ENABLED", False)
    fastgrad._COMPILED.clear()
    model = _conv_model(1)
    x = tf.constant(np.random.RandomState(0).rand(4, 12, 12, 1).astype(np.float32))
    attacks.input_gradient(model, x, lambda logits: tf.reduce_sum(logits, -1))
    assert not fastgrad._COMPILED
    assert fastgrad.override_status().startswith("off")


def test_override_is_reentrant_and_thread_safe(forced_on):
    original = _registered()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with fastgrad.input_gradient_override():
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    entered.wait(10)
    with fastgrad.input_gradient_override():
        with fastgrad.input_gradient_override():
            assert _registered() is not original
        assert _registered() is not original
    assert _registered() is not original  # the worker still holds it
    release.set()
    worker.join(10)
    assert _registered() is original


def test_fast_path_only_for_few_channels_static_shapes_and_float():
    checked = []

    def record(ci, dtype=tf.float32):
        @tf.function(input_signature=[tf.TensorSpec([None, 9, 9, ci], dtype)])
        def f(x):
            kernel = tf.ones([3, 3, ci, 2], dtype)
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
            checked.append(fastgrad._fast_path_args(y.op))
            return y
        f.get_concrete_function()

    record(1)
    record(fastgrad.MAX_INPUT_CHANNELS)
    record(fastgrad.MAX_INPUT_CHANNELS + 1)
    record(1, tf.float16)
    assert checked[0] == ((9, 9), (1, 1), "SAME")
    assert checked[1] is not None
    assert checked[2] is None and checked[3] is None


def test_a_foreign_registry_layout_turns_it_off_without_failing(monkeypatch):
    table = ops._gradient_registry._registry  # pylint: disable=protected-access
    original = table["Conv2D"]
    monkeypatch.setitem(table, "Conv2D", ("not", "a", "dict"))
    override = fastgrad._Override()
    assert override.enter() is False
    assert override.status.startswith("off: TensorFlow's gradient registry")
    monkeypatch.setitem(table, "Conv2D", original)


def test_describe_names_the_gradient_in_use(monkeypatch, forced_on):
    assert fastgrad.describe().startswith("fastgrad: matmul + col2im under XLA")
    monkeypatch.setattr(fastgrad, "ENABLED", False)
    assert fastgrad.describe() == "tensorflow (fastgrad.ENABLED is False)"


def test_auto_leaves_accelerators_alone(monkeypatch):
    """Measured on CPUs only: with a GPU visible ``"auto"`` keeps TF's gradient."""
    assert fastgrad.ENABLED == "auto"
    monkeypatch.setattr(fastgrad, "accelerator", lambda: "GPU")
    fastgrad._COMPILED.clear()
    before = _registered()
    with fastgrad.input_gradient_override():
        assert _registered() is before
    model = _conv_model(1)
    x = tf.constant(np.random.RandomState(0).rand(4, 12, 12, 1).astype(np.float32))
    attacks.input_gradient(model, x, lambda logits: tf.reduce_sum(logits, -1))
    assert not fastgrad._COMPILED
    assert fastgrad.describe() == ("tensorflow (auto: a GPU is visible (measured on CPUs "
                                   "only))")
    monkeypatch.setattr(fastgrad, "ENABLED", True)  # forced on
    with fastgrad.input_gradient_override():
        assert _registered() is not before


def test_auto_is_off_under_tensorflows_eigen_kernels(monkeypatch):
    """Measured slower where TensorFlow runs without oneDNN (an AVX2 CPU whose
    user set TF_ENABLE_ONEDNN_OPTS=0): ``"auto"`` keeps TF's gradient there,
    and fused BatchNorm follows the same rule; with oneDNN both are on."""
    monkeypatch.setattr(fastgrad, "accelerator", lambda: None)
    monkeypatch.setattr(fastgrad.cpu, "onednn_in_use", lambda: True)
    assert fastgrad.enabled() and fused_bn.enabled()
    monkeypatch.setattr(fastgrad.cpu, "onednn_in_use", lambda: False)
    assert not fastgrad.enabled() and not fused_bn.enabled()
    before = _registered()
    with fastgrad.input_gradient_override():
        assert _registered() is before
    assert fastgrad.describe() == ("tensorflow (auto: TensorFlow runs its Eigen kernels "
                                   "(oneDNN off), where this measured slower)")
    assert fused_bn.describe().startswith("keras (unfused: auto: TensorFlow runs its Eigen")
    monkeypatch.setattr(fastgrad, "ENABLED", True)  # forced on
    assert fastgrad.enabled()


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_filter_gradient_under_the_override_is_tensorflows(mode, forced_on):
    """A gradient w.r.t. the kernel taken inside the scope (not what attacks
    do, but allowed) equals TensorFlow's, together with the input gradient."""
    rs = np.random.RandomState(4)
    x = tf.constant(rs.rand(3, 9, 9, 1))
    kernel = tf.Variable(rs.randn(4, 4, 1, 5))

    def grads(override):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 2, "VALID") ** 2)
        if not override:
            return tape.gradient(loss, [x, kernel])
        with fastgrad.input_gradient_override():
            return tape.gradient(loss, [x, kernel])

    fn = grads if mode == "eager" else tf.function(grads)
    fastgrad._COMPILED.clear()
    (dx, dk), (dx0, dk0) = fn(True), fn(False)
    assert list(fastgrad._COMPILED)  # the input gradient took the fast path
    np.testing.assert_allclose(dx.numpy(), dx0.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk.numpy(), dk0.numpy(), rtol=1e-12, atol=1e-12)
