"""RobustModel behaviour: export, reproducibility, XLA resolution, real data."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_backsmooth import attacks, objectives, xla_plan
from tf_backsmooth.robust_model import RobustModel
from tf_backsmooth.xla_plan import resolve_xla


def _cnn(seed=0, dropout=False, batchnorm=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.ReLU(), keras.layers.Flatten()]
    if dropout:
        layers.append(keras.layers.Dropout(0.3))
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _data(n=32):
    rs = np.random.RandomState(0)
    return rs.rand(n, 8, 8, 1).astype(np.float32), rs.randint(0, 3, n)


def _train(method, seed, jit=False, **kw):
    x, y = _data()
    model = RobustModel(_cnn(dropout=True, batchnorm=True), method=method,
                        epsilon=0.1, seed=seed, **kw)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.parametrize("method", ["backward_smoothing", "fgsm_rs"])
def test_same_seed_same_run_other_seed_other_run(method):
    a, b, c = _train(method, 1), _train(method, 1), _train(method, 2)
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)
    assert max(np.abs(wa - wc).max() for wa, wc in zip(a, c)) > 1e-4


def test_noise_differs_per_step_and_replica():
    model = RobustModel(_cnn(), epsilon=0.1, seed=5)
    seeds = {tuple(model.step_seed(s, r).numpy()) for s in range(20) for r in range(2)}
    assert len(seeds) == 40


def test_attack_runs_in_inference_mode_and_keeps_batchnorm_stats():
    """BS attacks in inference mode: after a step, the BN moving statistics
    equal those of the two training-mode passes alone (f(x), f(x'))."""
    x, y = _data(8)
    base = _cnn(batchnorm=True)
    model = RobustModel(base, epsilon=0.1, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True)
    bn = [ln for ln in base.layers if isinstance(ln, keras.layers.BatchNormalization)][0]
    calls = []
    original = bn.call

    def spy(inputs, training=None, **kw):
        calls.append(bool(training))
        return original(inputs, training=training, **kw)

    bn.call = spy
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # attack: f(x) (+grad), f(x1) (+grad) in inference; objective: 2 training
    # passes; the extra clean-accuracy pass is not needed for BS.
    assert calls == [False, False, True, True]


@pytest.mark.slow  # a subprocess
def test_save_exports_plain_keras_model_loadable_without_package(tmp_path):
    base = _cnn(batchnorm=True)
    model = RobustModel(base, epsilon=0.1)
    model.compile(optimizer="sgd")
    x, y = _data(16)
    model.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", base(x, training=False).numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.modules['tf_backsmooth'] = None  # importing it would fail
        import keras
        m = keras.models.load_model({str(path)!r})
        out = m(np.load({str(tmp_path / 'x.npy')!r}), training=False)
        np.testing.assert_allclose(np.asarray(out), np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-5)
        print('OK', type(m).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK Sequential" in proc.stdout


def test_compile_rejects_loss_and_metrics():
    model = RobustModel(_cnn(), epsilon=0.1)
    with pytest.raises(ValueError, match="loss"):
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="metrics"):
        model.compile(optimizer="sgd", metrics=["accuracy"])


def test_resolve_xla():
    assert resolve_xla(True) == (True, "requested")
    assert resolve_xla(False)[0] is False
    used, why = resolve_xla("auto")
    assert used == bool(tf.config.list_physical_devices("GPU")) and why.startswith("auto")
    with pytest.raises(ValueError, match="jit_compile"):
        resolve_xla("yes")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU rule")
def test_auto_xla_rule_on_cpu():
    """"auto" on a CPU: graph mode, except that BatchNorm models with an
    unrolled attack are left to a measurement (BUILD_NOTES.md, "Backward
    Smoothing step: profile and speed": XLA won there on one CPU, lost on
    another)."""
    for steps in (1, attacks.UNROLL_MAX_STEPS):
        used, why = resolve_xla("auto", batch_norm=True, attack_steps=steps)
        assert used is False and "until XLA and graph mode are timed" in why
        assert xla_plan.xla_needs_measurement("auto", batch_norm=True,
                                                  attack_steps=steps)
    assert not xla_plan.xla_needs_measurement(True, batch_norm=True,
                                                  attack_steps=1)
    for kw in ({"batch_norm": False, "attack_steps": 1},
               {"batch_norm": True, "attack_steps": 0},
               {"batch_norm": True, "attack_steps": attacks.UNROLL_MAX_STEPS + 1}):
        used, why = resolve_xla("auto", **kw)
        assert used is False and why.startswith("auto: CPU"), (kw, why)
        assert not xla_plan.xla_needs_measurement("auto", **kw)
    plain = RobustModel(_cnn(), method="backward_smoothing", epsilon=0.1)
    plain.compile(optimizer="sgd")
    assert not plain.xla and "no BatchNorm" in plain.xla_reason


def _fake_timer(xla_ms, graph_ms, calls):
    def timed(fn, args, xla):
        calls.append(xla)
        fn(*args)  # the real work, so tracing and variables behave as in use
        return (xla_ms if xla else graph_ms) / 1e3
    return timed


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU rule")
@pytest.mark.parametrize("xla_ms, graph_ms, expect", [(10, 20, True), (20, 10, False),
                                                     (9.7, 10, False)])
def test_measure_xla_keeps_the_faster_mode(monkeypatch, xla_ms, graph_ms, expect):
    """fit measures on its first batch where "auto" leaves the choice open,
    keeps XLA only when it wins by XLA_MARGIN, and remembers the decision
    for the method and attack length through set_params."""
    calls = []
    monkeypatch.setattr(xla_plan, "timed", _fake_timer(xla_ms, graph_ms, calls))
    x, y = _data(16)
    bn = RobustModel(_cnn(batchnorm=True), method="backward_smoothing", epsilon=0.1)
    bn.compile(optimizer="sgd")
    assert not bn.xla and "until" in bn.xla_reason
    bn.fit(x, y, batch_size=8, verbose=0)
    # One first call per mode, then 3 alternated rounds.
    assert calls == [False, True] + [False, True] * 3
    assert bn.xla is expect and "measured on a batch of 8" in bn.xla_reason
    assert f"XLA {xla_ms:.0f} ms, graph {graph_ms:.0f} ms" in bn.xla_reason
    reason = bn.xla_reason
    bn.fit(x, y, batch_size=8, verbose=0)
    assert len(calls) == 8  # measured once
    bn.set_params(steps=10)   # a while loop: the rule, no measurement
    bn.fit(x, y, batch_size=8, verbose=0)
    assert not bn.xla and "10-step" in bn.xla_reason and len(calls) == 8
    bn.set_params(steps=1)    # back: the earlier measurement holds
    bn.fit(x, y, batch_size=8, verbose=0)
    assert (bn.xla, bn.xla_reason) == (expect, reason) and len(calls) == 8


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU rule")
def test_measure_xla_changes_no_variable_and_no_update():
    """The real measurement (both modes run 4 times on the batch, BatchNorm
    statistics updated each time) leaves every variable as it was: a fit
    after it equals a fit of an unmeasured twin in the chosen mode."""
    x, y = _data(16)
    measured = RobustModel(_cnn(batchnorm=True), epsilon=0.1, seed=3)
    measured.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [v.numpy().copy() for v in measured.base_model.variables]
    used, why = measured.measure_xla(x, y, batch_size=8, repeats=1)
    assert "measured on a batch of 8" in why
    for v, b in zip(measured.base_model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    twin = RobustModel(_cnn(batchnorm=True), epsilon=0.1, seed=3)
    twin.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=used)
    for m in (measured, twin):
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(measured.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU rule")
def test_measure_xla_without_a_readable_batch_stays_in_graph_mode():
    bn = RobustModel(_cnn(batchnorm=True), epsilon=0.1)
    bn.compile(optimizer="sgd")
    x, _ = _data(8)
    used, why = bn.measure_xla(x)  # no labels
    assert used is False and "not measured" in why and "graph mode" in why


def test_short_attack_loops_are_unrolled(monkeypatch):
    """Up to UNROLL_MAX_STEPS steps build no while loop; same result as the loop."""
    model = _cnn()
    x = tf.constant(_data(4)[0])
    loss = attacks.surrogate("ce", tf.constant([0, 1, 2, 0]))
    fn = lambda t: model(t, training=False)  # noqa: E731

    def ops(steps):
        graph = tf.function(lambda x: attacks.iterate(fn, x, x, loss, 0.1, 0.03, steps))
        return {op.type for op in graph.get_concrete_function(x).graph.get_operations()}

    assert "While" not in ops(1) and "StatelessWhile" not in ops(1)
    assert ops(attacks.UNROLL_MAX_STEPS + 1) & {"While", "StatelessWhile"}
    steps = attacks.UNROLL_MAX_STEPS
    unrolled = tf.function(lambda x: attacks.iterate(fn, x, x, loss, 0.1, 0.03, steps))(x)
    monkeypatch.setattr(attacks, "UNROLL_MAX_STEPS", 0)
    looped = tf.function(lambda x: attacks.iterate(fn, x, x, loss, 0.1, 0.03, steps))(x)
    np.testing.assert_array_equal(unrolled.numpy(), looped.numpy())


def test_logs_terms_and_accuracies():
    x, y = _data()
    model = RobustModel(_cnn(), method="trades", epsilon=0.1, steps=2)
    model.compile(optimizer="sgd")
    logs = model.fit(x, y, batch_size=8, verbose=0).history
    assert set(logs) == {"loss", "natural_loss", "robust_loss", "clean_accuracy", "adv_accuracy"}
    assert logs["loss"][0] == pytest.approx(logs["natural_loss"][0] + logs["robust_loss"][0], rel=1e-5)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) == {"loss", "clean_accuracy"}


@pytest.mark.slow  # trains two models on real MNIST
def test_end_to_end_real_mnist_backward_smoothing_beats_natural(mnist_dir):
    from tf_backsmooth import data, models
    x, y = data.load_arrays("mnist", "train", str(mnist_dir), num_examples=4000)
    xt, yt = data.load_arrays("mnist", "test", str(mnist_dir), num_examples=500)
    x, xt = x.astype(np.float32) / 255, xt.astype(np.float32) / 255
    eps = 0.1
    accuracy = {}
    for method in ("natural", "backward_smoothing"):
        keras.utils.set_random_seed(0)
        base = models.get("mnist_cnn", 10, (28, 28, 1))
        kw = {} if method == "natural" else {"epsilon": eps}
        model = RobustModel(base, method=method, seed=0, **kw)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(x, y, batch_size=64, epochs=4, verbose=0)
        f = lambda t: base(t, training=False)  # noqa: E731
        x_adv = attacks.pgd(f, xt, yt, eps, eps / 4, 10, seed=0)
        accuracy[method] = (float(tf.reduce_mean(objectives.correct(yt, f(xt)))),
                            float(tf.reduce_mean(objectives.correct(yt, f(x_adv)))))
    nat, bs = accuracy["natural"], accuracy["backward_smoothing"]
    print(accuracy)
    assert nat[0] > 0.9 and bs[0] > 0.85
    assert bs[1] > nat[1] + 0.3, accuracy


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU rule")
def test_measure_xla_is_skipped_under_a_strategy():
    """Under MirroredStrategy nothing is timed (the step runs per replica);
    graph mode stays, and the reason says so."""
    from conftest import two_replica_strategy  # one per process (collective keys)

    strategy = two_replica_strategy()
    with strategy.scope():
        bn = RobustModel(_cnn(batchnorm=True), epsilon=0.1)
        bn.compile(optimizer="sgd")
    x, y = _data(16)
    bn.fit(x, y, batch_size=8, verbose=0)
    assert not bn.xla and "not measured under a distribution strategy" in bn.xla_reason
