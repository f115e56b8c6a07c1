"""RobustModel behaviour: export, reproducibility, XLA resolution, real data."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_backsmooth import attacks, objectives
from tf_backsmooth.robust_model import RobustModel, resolve_xla


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
    """"auto" on a CPU: XLA only for BatchNorm models with an unrolled attack
    (BUILD_NOTES.md, "Backward Smoothing step: profile and speed")."""
    assert resolve_xla("auto", batch_norm=True, attack_steps=1)[0] is True
    assert resolve_xla("auto", batch_norm=True, attack_steps=attacks.UNROLL_MAX_STEPS)[0]
    for kw in ({"batch_norm": False, "attack_steps": 1},
               {"batch_norm": True, "attack_steps": 0},
               {"batch_norm": True, "attack_steps": attacks.UNROLL_MAX_STEPS + 1}):
        used, why = resolve_xla("auto", **kw)
        assert used is False and why.startswith("auto: CPU"), (kw, why)
    bn = RobustModel(_cnn(batchnorm=True), method="backward_smoothing", epsilon=0.1)
    bn.compile(optimizer="sgd")
    assert bn.xla and "BatchNorm" in bn.xla_reason
    plain = RobustModel(_cnn(), method="backward_smoothing", epsilon=0.1)
    plain.compile(optimizer="sgd")
    assert not plain.xla and "no BatchNorm" in plain.xla_reason
    # The rule is re-applied when the step is rebuilt after an attack change.
    x, y = _data(8)
    bn.set_params(steps=10)
    bn.fit(x, y, batch_size=8, verbose=0)
    assert not bn.xla and "10-step" in bn.xla_reason


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
