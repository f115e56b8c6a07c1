"""Method registry, parameter validation, and one hand-computed fit step each.

For a linear classifier with fixed weights, the expected SGD update of every
method is computed in NumPy: the adversarial examples with closed-form input
gradients and the noise reproduced from the seed (reference.py mirrors the
hash RNG), then the float64 loss differentiated by central differences. One
``fit`` step must match it in eager, graph and XLA mode.
"""

import dataclasses

import keras
import numpy as np
import pytest
import reference as ref
from conftest import MODES

from tf_backsmooth import methods
from tf_backsmooth.config import ConfigError
from tf_backsmooth.robust_model import RobustModel

B, D, C = 8, 5, 3
EPS, LR, SEED = 0.1, 0.5, 3


def _setup():
    rs = np.random.RandomState(10)
    W = rs.randn(D, C).astype(np.float32)
    b = (rs.randn(C) * 0.1).astype(np.float32)
    x = rs.uniform(0.02, 0.98, (B, D)).astype(np.float32)
    y = rs.randint(0, C, B)
    return W, b, x, y


def _seeds():
    step_seed = ref.fold_in(ref.fold_in([SEED, 0], 0), 0)
    return ref.fold_in(step_seed, 1), ref.fold_in(step_seed, 2)


def _expected_loss(name, params, W0, b0, x, y):
    """Returns (loss(W, b) in float64, x_adv) for the method, by hand."""
    a_seed, o_seed = _seeds()
    eps, step, steps, beta = params.epsilon, params.step_size, params.steps, params.beta
    x64 = x.astype(np.float64)
    W0, b0 = W0.astype(np.float64), b0.astype(np.float64)
    trades_loss = lambda xa: lambda W, b: np.mean(  # noqa: E731
        ref.ce(x64 @ W + b, y) + beta * ref.kl(x64 @ W + b, xa @ W + b))
    ce_loss = lambda xa: lambda W, b: np.mean(ref.ce(xa @ W + b, y))  # noqa: E731
    if name == "natural":
        return ce_loss(x64)
    if name == "pgd_at":
        init = ref.uniform((B, D), ref.fold_in(a_seed, 0), -eps, eps)
        return ce_loss(ref.pgd(x64, y, W0, b0, eps, step, steps, init))
    if name == "trades":
        init = 0.001 * ref.normal((B, D), a_seed)
        return trades_loss(ref.trades(x64, W0, b0, eps, step, steps, init))
    if name == "fast_trades":
        init = ref.uniform((B, D), a_seed, -eps, eps)
        return trades_loss(ref.trades(x64, W0, b0, eps, step, 1, init))
    if name == "fgsm_rs":
        init = ref.uniform((B, D), a_seed, -eps, eps)
        return ce_loss(ref.fgsm(x64, y, W0, b0, eps, step, init))
    if name == "n_fgsm":
        init = ref.uniform((B, D), a_seed, -2 * eps, 2 * eps)
        return ce_loss(ref.fgsm(x64, y, W0, b0, eps, step, init, to_ball=False))
    if name == "backward_smoothing":
        u = ref.uniform((B, C), a_seed, -1, 1)
        return trades_loss(ref.backward_smoothing(x64, W0, b0, eps, step, params.gamma, steps, u))
    if name == "gradalign":
        x_adv = ref.fgsm(x64, y, W0, b0, eps, step)
        eta = ref.uniform((B, D), o_seed, -eps, eps)
        g1 = ref.grad_ce(x64, y, W0, b0)  # detached in the reference

        def loss(W, b):
            g2 = ref.grad_ce(x64 + eta, y, W, b)
            cos = (g1 * g2).sum(1) / (np.linalg.norm(g1, axis=1) * np.linalg.norm(g2, axis=1))
            return np.mean(ref.ce(x_adv @ W + b, y) + params.get("lambda_") * (1 - cos))
        return loss
    raise AssertionError(name)


def _robust(name, W, b, **kw):
    base = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C)])
    base.set_weights([W, b])
    if name != "natural":
        kw.setdefault("epsilon", EPS)
    kw.setdefault("seed", SEED)
    return RobustModel(base, method=name, **kw)


def test_every_method_has_an_analytic_test():
    assert set(methods.names()) == {
        "natural", "pgd_at", "trades", "fgsm_rs", "fast_trades", "gradalign",
        "n_fgsm", "backward_smoothing"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(methods.names()))
def test_one_fit_step_equals_hand_computed_update(name, mode):
    W, b, x, y = _setup()
    kw = {"steps": 3} if name in ("pgd_at", "trades") else {}
    model = _robust(name, W, b, **kw)
    model.compile(optimizer=keras.optimizers.SGD(LR), run_eagerly=(mode == "eager"),
                  jit_compile=(mode == "xla"))
    assert model.xla == (mode == "xla")
    history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    loss_fn = _expected_loss(name, model.params, W, b, x, y)
    W64, b64 = W.astype(np.float64), b.astype(np.float64)
    gW, gb = ref.numeric_grad(loss_fn, [W64, b64])
    new_W, new_b = model.base_model.get_weights()
    np.testing.assert_allclose(new_W, W64 - LR * gW, atol=2e-5)
    np.testing.assert_allclose(new_b, b64 - LR * gb, atol=2e-5)
    assert np.abs(gW).max() > 1e-3  # the update is not trivially zero
    np.testing.assert_allclose(history.history["loss"][0], loss_fn(W64, b64), rtol=1e-4)


# --------------------------------------------------------------- validation
def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="unknown method 'bogus'.*backward_smoothing.*trades"):
        methods.get("bogus")


@pytest.mark.parametrize("param,value", [
    ("epsilon", float("nan")), ("epsilon", float("inf")), ("epsilon", -0.1),
    ("epsilon", 0.0), ("epsilon", 8.0), ("step_size", float("nan")),
    ("step_size", -1.0), ("step_size", 2.0), ("gamma", float("nan")),
    ("gamma", -1.0), ("beta", float("inf")), ("beta", -6.0), ("steps", 0),
    ("steps", -3), ("steps", 2.5), ("steps", True), ("epsilon", "0.3"),
])
def test_bad_parameter_raises_value_error_naming_it(param, value):
    W, b, _, _ = _setup()
    kw = {"epsilon": 0.3, param: value}
    with pytest.raises(ValueError, match=param):
        _robust("backward_smoothing", W, b, **kw)


def test_method_specific_validation():
    W, b, _, _ = _setup()
    with pytest.raises(ValueError, match="lambda_"):
        _robust("gradalign", W, b, lambda_=-1.0)
    with pytest.raises(ValueError, match="unknown keyword.*lambda_"):
        _robust("trades", W, b, lambda_=0.1)
    with pytest.raises(ValueError, match="steps must be 1"):
        _robust("fgsm_rs", W, b, steps=5)
    with pytest.raises(ValueError, match="runs no attack"):
        _robust("natural", W, b, epsilon=0.3)
    with pytest.raises(ValueError, match="epsilon is required"):
        RobustModel(keras.Sequential([keras.Input((D,)), keras.layers.Dense(C)]), method="trades")
    with pytest.raises(ValueError, match="attack_training"):
        _robust("trades", W, b, attack_training="yes")
    with pytest.raises(ValueError, match="seed"):
        _robust("trades", W, b, seed=1.5)
    with pytest.raises(ConfigError):
        methods.resolve_params("pgd_at", epsilon=0.3, steps=10, random_start=True, restarts=2)


def test_defaults_follow_the_references():
    p = methods.resolve_params("backward_smoothing", epsilon=0.3)
    assert (p.step_size, p.steps, p.gamma, p.beta) == (0.3, 1, 1.0, 6.0)
    assert methods.resolve_params("fgsm_rs", epsilon=0.2).step_size == pytest.approx(0.25)
    assert methods.resolve_params("pgd_at", epsilon=0.3).steps == 10
    assert methods.resolve_params("n_fgsm", epsilon=0.1).get("init_scale") == 2.0
    assert methods.get("fgsm_rs").attack_training and not methods.get("backward_smoothing").attack_training
    for name in methods.names():
        assert methods.get(name).reference


def test_natural_needs_no_attack_parameters():
    W, b, x, y = _setup()
    model = _robust("natural", W, b)
    model.compile(optimizer="sgd")
    logs = model.fit(x, y, batch_size=B, verbose=0).history
    assert "adv_accuracy" not in logs and "clean_accuracy" in logs


# ------------------------------------------------------------ epsilon warm-up
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(set(methods.names()) - {"natural"}))
def test_one_step_at_a_warmed_up_epsilon_equals_hand_computed_update(name, mode):
    """Step 0 of a 4-step linear warm-up trains at eps/4 with every step size
    scaled by 1/4: the update equals the hand computation at those values."""
    from tf_backsmooth import schedules

    W, b, x, y = _setup()
    kw = {"steps": 3} if name in ("pgd_at", "trades") else {}
    model = _robust(name, W, b, epsilon_schedule=schedules.EpsilonWarmup(EPS, 4), **kw)
    model.compile(optimizer=keras.optimizers.SGD(LR), run_eagerly=(mode == "eager"),
                  jit_compile=(mode == "xla"))
    history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    assert history.history["epsilon"][0] == pytest.approx(EPS / 4)
    full = model.params
    scaled = dataclasses.replace(full, epsilon=EPS / 4, step_size=full.step_size / 4)
    loss_fn = _expected_loss(name, scaled, W, b, x, y)
    W64, b64 = W.astype(np.float64), b.astype(np.float64)
    gW, gb = ref.numeric_grad(loss_fn, [W64, b64])
    new_W, new_b = model.base_model.get_weights()
    np.testing.assert_allclose(new_W, W64 - LR * gW, atol=2e-5)
    np.testing.assert_allclose(new_b, b64 - LR * gb, atol=2e-5)
    # ... and differs from the update at the full epsilon (the test can fail).
    gW_full, _ = ref.numeric_grad(_expected_loss(name, full, W, b, x, y), [W64, b64])
    assert np.abs(LR * (gW - gW_full)).max() > 1e-4


def test_fgsm_rs_unclipped_start_is_a_method_keyword():
    p = methods.resolve_params("fgsm_rs", epsilon=0.3, clip_start=False)
    assert p.get("clip_start") is False
    assert methods.resolve_params("fgsm_rs", epsilon=0.3).get("clip_start") is True
    with pytest.raises(ValueError, match="clip_start"):
        methods.resolve_params("fgsm_rs", epsilon=0.3, clip_start="no")
    with pytest.raises(ValueError, match="unknown keyword"):
        methods.resolve_params("trades", epsilon=0.3, clip_start=False)
