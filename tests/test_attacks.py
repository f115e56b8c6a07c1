"""Attacks against hand-computed NumPy expectations on a linear classifier.

For ``f(x) = x W + b`` every input gradient has a closed form (reference.py),
so each attack's ``x_adv`` is computed by hand and compared in eager, graph and
XLA mode. Property tests then check the invariants on a small CNN.
"""

import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from conftest import MODES, run_in_mode

from tf_backsmooth import attacks, objectives, rng

B, D, C = 8, 5, 3
EPS, STEP = 0.1, 0.04


@pytest.fixture(scope="module")
def linear():
    rs = np.random.RandomState(1)
    W = rs.randn(D, C).astype(np.float32)
    b = rs.randn(C).astype(np.float32) * 0.1
    x = rs.uniform(0.02, 0.98, (B, D)).astype(np.float32)  # clip to [0,1] active
    y = rs.randint(0, C, B)
    model_fn = lambda v: tf.matmul(v, W) + b  # noqa: E731
    return W, b, x, y, model_fn


def _close(got, expected):
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_fgsm_zero_and_random_start(linear, mode):
    W, b, x, y, f = linear
    got = run_in_mode(lambda: attacks.fgsm(f, x, y, EPS), mode)
    _close(got, ref.fgsm(x, y, W, b, EPS, EPS))
    got = run_in_mode(lambda: attacks.fgsm(f, x, y, EPS, 1.25 * EPS, random_start=True, seed=4), mode)
    init = ref.uniform((B, D), 4, -EPS, EPS)
    _close(got, ref.fgsm(x, y, W, b, EPS, 1.25 * EPS, init))


@pytest.mark.parametrize("mode", MODES)
def test_fgsm_without_projection_is_n_fgsm(linear, mode):
    W, b, x, y, f = linear
    noise = np.random.RandomState(2).uniform(-2 * EPS, 2 * EPS, (B, D)).astype(np.float32)
    got = run_in_mode(lambda: attacks.fgsm(f, x, y, EPS, EPS, init_noise=noise, to_ball=False), mode)
    expected = ref.fgsm(x, y, W, b, EPS, EPS, noise, to_ball=False)
    _close(got, expected)
    assert np.abs(expected - x).max() > EPS + 1e-3  # really left the ball


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd(linear, mode, loss):
    W, b, x, y, f = linear
    got = run_in_mode(lambda: attacks.pgd(f, x, y, EPS, STEP, 5, loss=loss, random_start=False), mode)
    _close(got, ref.pgd(x, y, W, b, EPS, STEP, 5, loss=loss))
    # Random start: restart 0 draws U(-eps, eps) from fold_in(seed, 0).
    got = run_in_mode(lambda: attacks.pgd(f, x, y, EPS, STEP, 5, loss=loss, seed=11), mode)
    init = ref.uniform((B, D), ref.fold_in([11, 0], 0), -EPS, EPS)
    _close(got, ref.pgd(x, y, W, b, EPS, STEP, 5, init, loss=loss))


@pytest.mark.parametrize("mode", MODES)
def test_trades_kl(linear, mode):
    W, b, x, y, f = linear
    noise = 0.001 * np.random.RandomState(3).randn(B, D).astype(np.float32)
    got = run_in_mode(lambda: attacks.trades_kl(f, x, EPS, STEP, 4, init_noise=noise), mode)
    _close(got, ref.trades(x, W, b, EPS, STEP, 4, noise))
    # Default start: x + 0.001 * N(0, 1) from the seed.
    got = run_in_mode(lambda: attacks.trades_kl(f, x, EPS, STEP, 4, seed=8), mode)
    _close(got, ref.trades(x, W, b, EPS, STEP, 4, 0.001 * ref.normal((B, D), 8)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps", [1, 3])
def test_backward_smoothing(linear, mode, steps):
    W, b, x, y, f = linear
    u = np.random.RandomState(4).uniform(-1, 1, (B, C)).astype(np.float32)
    got = run_in_mode(lambda: attacks.backward_smoothing(f, x, EPS, EPS, 1.0, steps, logit_noise=u), mode)
    _close(got, ref.backward_smoothing(x, W, b, EPS, EPS, 1.0, steps, u))
    # Seeded logit noise U(-1, 1) of shape [batch, classes], scaled by gamma.
    got = run_in_mode(lambda: attacks.backward_smoothing(f, x, EPS, 0.05, 2.0, steps, seed=9), mode)
    _close(got, ref.backward_smoothing(x, W, b, EPS, 0.05, 2.0, steps, ref.uniform((B, C), 9, -1, 1)))


def test_attacks_stop_gradients(linear):
    W, b, x, y, f = linear
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = attacks.backward_smoothing(f, xt, EPS, EPS, seed=1)
    assert tape.gradient(out, xt) is None


# ------------------------------------------------------------------ properties
@pytest.fixture(scope="module")
def cnn():
    import keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(5)])
    x = np.random.RandomState(5).rand(16, 8, 8, 1).astype(np.float32)
    x[:, 0] = 0.0
    x[:, -1] = 1.0  # boundary pixels exercise the [0, 1] clip
    y = np.random.RandomState(6).randint(0, 5, 16)
    return lambda v: model(v, training=False), x, y


ALL_ATTACKS = {
    "fgsm": lambda f, x, y, e, s: attacks.fgsm(f, x, y, e, 1.25 * e, random_start=True, seed=s),
    "pgd_ce": lambda f, x, y, e, s: attacks.pgd(f, x, y, e, e / 4, 7, seed=s),
    "pgd_margin_restarts": lambda f, x, y, e, s: attacks.pgd(f, x, y, e, e / 4, 3, loss="margin", restarts=3, seed=s),
    "trades_kl": lambda f, x, y, e, s: attacks.trades_kl(f, x, e, e / 2, 3, seed=s),
    "trades_uniform": lambda f, x, y, e, s: attacks.trades_kl(f, x, e, e, 1, seed=s, init="uniform"),
    "backward_smoothing": lambda f, x, y, e, s: attacks.backward_smoothing(f, x, e, e, 1.0, 2, seed=s),
}


@pytest.mark.parametrize("name", sorted(ALL_ATTACKS))
@pytest.mark.parametrize("eps,seed", [(0.3, 0), (0.031, 1), (0.5, 2)])
def test_inside_ball_and_unit_box(cnn, name, eps, seed):
    f, x, y = cnn
    x_adv = ALL_ATTACKS[name](f, x, y, eps, seed).numpy()
    assert x_adv.shape == x.shape
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() > 0.5 * eps  # it did move


@pytest.mark.parametrize("seed", range(3))
def test_backward_step_lowers_kl_to_smoothed_target(cnn, seed):
    f, x, y = cnn
    u = rng.uniform([16, 5], seed, -1.0, 1.0)
    target = f(x) + 1.0 * u
    before = objectives.kl_divergence(target, f(x))
    # steps=0: only the backward step.
    x1 = attacks.backward_smoothing(f, x, 0.05, 0.01, 1.0, steps=0, logit_noise=u)
    after = objectives.kl_divergence(target, f(x1))
    assert np.mean(after.numpy() < before.numpy()) >= 0.9
    assert float(tf.reduce_mean(after)) < float(tf.reduce_mean(before))


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_restarts_never_weaker_than_one_start(cnn, loss):
    f, x, y = cnn
    for seed in range(3):
        one = attacks.pgd(f, x, y, 0.1, 0.03, 3, loss=loss, restarts=1, seed=seed)
        many = attacks.pgd(f, x, y, 0.1, 0.03, 3, loss=loss, restarts=4, seed=seed)
        wrong_one = objectives.correct(y, f(one)).numpy() == 0
        wrong_many = objectives.correct(y, f(many)).numpy() == 0
        assert np.all(wrong_many >= wrong_one)
        l1 = attacks.surrogate(loss, y)(f(one)).numpy()
        lm = attacks.surrogate(loss, y)(f(many)).numpy()
        same = wrong_one == wrong_many
        assert np.all(lm[same] >= l1[same] - 1e-5)


def test_pgd_rejects_bad_restarts_and_loss(cnn):
    f, x, y = cnn
    with pytest.raises(ValueError, match="restarts"):
        attacks.pgd(f, x, y, 0.1, 0.01, 1, restarts=0)
    with pytest.raises(ValueError, match="loss"):
        attacks.pgd(f, x, y, 0.1, 0.01, 1, loss="l2")


@pytest.mark.parametrize("mode", MODES)
def test_fgsm_unclipped_start_takes_the_gradient_outside_the_box(mode):
    """``clip_start=False`` (Wong et al.'s MNIST code) takes the input gradient
    at the raw start ``x + delta``, which leaves ``[0, 1]`` near black pixels;
    ``clip_start=True`` at the projected start. On ``f(x) = sin(8x) W + b`` the
    gradient's sign flips between the two points, so the results differ."""
    rs = np.random.RandomState(5)
    W = rs.randn(D, C).astype(np.float32)
    b = np.zeros(C, np.float32)
    x = np.where(rs.rand(B, D) < 0.6, 0.0, rs.uniform(0.0, 1.0, (B, D))).astype(np.float32)
    y = rs.randint(0, C, B)
    eps, step = 0.3, 0.375
    noise = rs.uniform(-eps, eps, (B, D)).astype(np.float32)
    f = lambda v: tf.matmul(tf.sin(8.0 * v), W) + b  # noqa: E731

    def grad(v):  # d/dv sum CE(sin(8v) W + b, y)
        z = np.sin(8 * v) @ W + b
        return 8 * np.cos(8 * v) * ((ref.softmax(z) - ref.onehot(y, C)) @ W.T)

    x64 = x.astype(np.float64)
    raw = x64 + noise
    expected = {False: ref.clip(raw + step * np.sign(grad(raw)), x64, eps),
                True: ref.clip(ref.clip(raw, x64, eps)
                               + step * np.sign(grad(ref.clip(raw, x64, eps))), x64, eps)}
    assert np.abs(expected[False] - expected[True]).max() > 0.1  # the option matters here
    for clip_start in (False, True):
        got = run_in_mode(lambda: attacks.fgsm(f, x, y, eps, step, init_noise=noise,
                                               clip_start=clip_start), mode)
        _close(got, expected[clip_start])
