"""One source for each name, default and helper: seed streams,
the CO guard's defaults, the epsilon check, the gradient cosine, APGD's home."""

import inspect
import re

import numpy as np
import pytest
import tensorflow as tf

from tf_backsmooth import attacks, co_guard, config, evaluation, fileio, methods, objectives, rng


def test_seed_stream_values_never_change():
    """Every random number of a run depends on these values: changing one
    breaks bit-identical reruns and resumes of earlier runs."""
    assert (rng.TRAIN_ATTACK, rng.TRAIN_OBJECTIVE, rng.AUGMENT) == (1, 2, 7)
    assert (rng.CO_GUARD, rng.CO_GUARD_PGD, rng.CO_GUARD_ALIGNMENT) == (0x5EED, 1, 2)
    assert rng.EVAL_ATTACKS == {"fgsm": 1, "pgd": 2, "pgd_margin": 3, "apgd_ce": 4,
                                "apgd_t": 5, "square": 6, "fab_t": 7}
    assert set(rng.EVAL_ATTACKS) == set(evaluation.ATTACKS)


def test_co_guard_defaults_are_one_table():
    d = config.CO_GUARD
    train = config.TrainConfig()
    assert (train.co_guard_every, train.co_guard_examples, train.co_guard_pgd_steps,
            train.co_guard_rule, train.co_guard_drop, train.co_guard_gap,
            train.co_guard_floor, train.co_guard_policy, train.co_guard_factor,
            train.co_guard_fallback, train.co_guard_max_collapses) == (
        d.every_steps, d.examples, d.pgd_steps, d.rule, d.drop, d.gap, d.floor, d.policy,
        d.factor, d.fallback, d.max_collapses)
    signature = inspect.signature(co_guard.COGuard).parameters
    for name in ("every_steps", "pgd_steps", "rule", "drop", "gap", "floor", "window",
                 "policy", "factor", "fallback", "max_collapses"):
        assert signature[name].default == getattr(d, name), name
    guard = co_guard.COGuard(measure_fn=lambda model: {})
    assert guard.every_steps == train.co_guard_every == 200


@pytest.mark.parametrize("value,ok", [(0.1, True), (1.0, True), (0.0, False), (-0.1, False),
                                      (1.5, False), (float("nan"), False), ("0.1", False)])
def test_one_epsilon_check(value, ok):
    checks = [lambda v: config.check_epsilon(v),
              lambda v: config.TrainConfig(epsilon=v),
              lambda v: co_guard.COGuard(measure_fn=lambda m: {}, epsilon=v),
              lambda v: methods.resolve_params("pgd_at", epsilon=v)]
    for check in checks:
        if ok:
            check(value)
        else:
            with pytest.raises(config.ConfigError, match="epsilon"):
                check(value)


def test_gradient_cosine_matches_numpy():
    rs = np.random.RandomState(0)
    g1 = rs.randn(4, 3, 2).astype(np.float32)
    g2 = rs.randn(4, 3, 2).astype(np.float32)
    g2[1] = 0.0  # a zero gradient: cosine 0, masked out
    cos, nonzero = objectives.gradient_cosine(tf.constant(g1), tf.constant(g2))
    f1, f2 = g1.reshape(4, -1), g2.reshape(4, -1)
    norms = np.linalg.norm(f1, axis=1) * np.linalg.norm(f2, axis=1)
    expected = np.where(norms > 0, (f1 * f2).sum(1) / np.maximum(norms, 1e-20), 0.0)
    np.testing.assert_allclose(cos.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(nonzero.numpy(), [1, 0, 1, 1])


def test_apgd_lives_in_attacks_only():
    for name in ("apgd", "apgd_checkpoints", "dlr_loss", "dlr_targeted_loss",
                 "target_classes", "APGDResult", "APGD_RHO", "APGD_MOMENTUM"):
        assert hasattr(attacks, name) and not hasattr(evaluation, name), name
    assert attacks.apgd.__module__ == "tf_backsmooth.attacks"


def test_read_json(tmp_path):
    path = tmp_path / "a.json"
    assert fileio.read_json(path, default=[]) == []
    with pytest.raises(FileNotFoundError):
        fileio.read_json(path)
    fileio.write_json(path, {"a": [1, 2]})
    assert fileio.read_json(path) == {"a": [1, 2]}


def test_method_keyword_flags_come_from_the_registry():
    """Every keyword a registered method accepts (``Method.keywords``) is a
    bin/train flag (``flags._METHOD_KWARG_FLAGS``) or deliberately not one
    (``flags._UNFLAGGED_METHOD_KWARGS``), and every such flag is some method's
    keyword, passed on only when set."""
    from absl import flags as absl_flags

    from tf_backsmooth import flags as tbs_flags

    flagged = set(tbs_flags._METHOD_KWARGS)
    unflagged = set(tbs_flags._UNFLAGGED_METHOD_KWARGS)
    assert not flagged & unflagged
    assert flagged | unflagged == set(methods.keyword_names())
    for name in methods.names():
        assert set(methods.get(name).keywords) <= flagged | unflagged, name
    fv = absl_flags.FlagValues()
    tbs_flags.define_flags(fv)
    fv(["bin/train", "--method=fgsm_rs", "--clip_start=false", "--init_scale=0.5"])
    assert all(fv[name].default is None for name in flagged)
    assert tbs_flags.config_from_flags(fv).method_kwargs == {"clip_start": False,
                                                             "init_scale": 0.5}


def test_moved_names_say_where_they_went():
    """A name that left a module fails naming its new place, and that place exists."""
    import importlib

    from tf_backsmooth import co_guard, robust_model, train_lib

    for module in (train_lib, evaluation, robust_model, co_guard):
        assert module.MOVED
        for old, new in module.MOVED.items():
            assert old not in vars(module), f"{module.__name__}.{old} is still defined"
            with pytest.raises(AttributeError, match=f"moved: use {re.escape(new)}"):
                getattr(module, old)
            if new.startswith("tf_backsmooth."):
                path = new.split("(")[0]
                target, attr = path.rsplit(".", 1)
                assert hasattr(importlib.import_module(target), attr), new
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        train_lib.no_such_name  # noqa: B018
