"""Robustness evaluation: APGD against a NumPy reference, attack invariants on
a small MNIST model trained here, sanity checks, bin/evaluate end to end, and a
cross-check of PGD against Foolbox 3.
"""

import gzip
import json
import os
import subprocess
import sys
from fractions import Fraction

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from conftest import MODES, REPO, run_in_mode, shared_data_dir
from toy_cnn import trained_small_cnn

from tf_backsmooth import attacks
from tf_backsmooth import evaluation as ev

EVALUATE = REPO / "bin" / "evaluate"
EPS = 0.1


# ----------------------------------------------------------------------------
# Data and models (module scope: trained once, a few seconds)
# ----------------------------------------------------------------------------
def _read_idx(path):
    """A tiny IDX reader, used if tf_backsmooth.data is unavailable."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load(mnist, split, n):
    try:
        from tf_backsmooth import data
        x, y = data.load_arrays("mnist", split, data_dir=str(mnist),
                                validation_size=0, num_examples=n)
    except ImportError:
        prefix = "train" if split == "train" else "t10k"
        x = _read_idx(mnist / f"{prefix}-images-idx3-ubyte.gz")[:n, :, :, None]
        y = _read_idx(mnist / f"{prefix}-labels-idx1-ubyte.gz")[:n]
    return np.asarray(x, np.float32) / 255.0, np.asarray(y, np.int64)


@pytest.fixture(scope="module")
def mnist():
    path = shared_data_dir("mnist")
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {path}")
    x, y = _load(path, "train", 2000)
    xt, yt = _load(path, "test", 600)
    return path, x, y, xt, yt


@pytest.fixture(scope="module")
def model(mnist):
    _, x, y, _, _ = mnist
    return trained_small_cnn(x, y)


@pytest.fixture(scope="module")
def saved_run(model, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model.save(run / "model.keras")
    return run


# ----------------------------------------------------------------------------
# APGD: schedule and algorithm against an independent NumPy reference
# ----------------------------------------------------------------------------
def _paper_checkpoints(n):
    """w_j = ceil(p_j n), p_0 = 0, p_1 = .22, p_{j+1} = p_j + max(p_j - p_{j-1} - .03, .06)."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    w = [-(-(q * n).numerator // (q * n).denominator) for q in p[1:] if q * n <= n]
    return sorted(set(v for v in w if v >= 1))


def test_apgd_checkpoints_match_formula():
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n in (1, 2, 5, 10, 20, 37, 50, 100, 250, 1000):
        assert attacks.apgd_checkpoints(n) == _paper_checkpoints(n), n
    assert attacks.apgd_checkpoints(0) == []


D, H, C, B = 40, 32, 5, 16


@pytest.fixture(scope="module")
def mlp():
    rs = np.random.RandomState(6)
    W1 = rs.randn(D, H).astype(np.float32)
    b1 = (rs.randn(H) * 0.5).astype(np.float32)
    W2 = rs.randn(H, C).astype(np.float32)
    b2 = (rs.randn(C) * 0.1).astype(np.float32)
    x = rs.uniform(0, 1, (B, D)).astype(np.float32)
    params = (W1, b1, W2, b2)
    y = _mlp_np(params, x)[1].argmax(1)  # all correct before the attack
    fn = lambda v: tf.matmul(tf.tanh(tf.matmul(v, W1) + b1), W2) + b2  # noqa: E731
    return params, x, y, fn


def _mlp_np(params, x):
    W1, b1, W2, b2 = [p.astype(np.float64) for p in params]
    h = np.tanh(x @ W1 + b1)
    return h, h @ W2 + b2


def _np_loss_grad(params, x, y, loss, targets):
    """Per-example loss, its input gradient and the logits (float64)."""
    W1, _, W2, _ = [p.astype(np.float64) for p in params]
    h, z = _mlp_np(params, x)
    n = np.arange(len(y))
    if loss == "ce":
        value = ref.ce(z, y)
        dz = ref.softmax(z) - ref.onehot(y, C)
    else:  # targeted DLR, with the sort order fixed at this point
        order = np.argsort(-z, axis=1)
        den = z[n, order[:, 0]] - 0.5 * (z[n, order[:, 2]] + z[n, order[:, 3]])
        num = z[n, y] - z[n, targets]
        value = -num / den
        dnum = ref.onehot(y, C) - ref.onehot(targets, C)
        dden = ref.onehot(order[:, 0], C) - 0.5 * (ref.onehot(order[:, 2], C)
                                                   + ref.onehot(order[:, 3], C))
        dz = -(dnum * den[:, None] - num[:, None] * dden) / den[:, None] ** 2
    grad = ((dz @ W2.T) * (1 - h ** 2)) @ W1.T
    return value, grad, z


def _np_apgd(params, x, y, eps, steps, noise, loss="ce", targets=None,
             rho=0.75, alpha=0.75):
    """APGD written from Croce & Hein (2020), Algorithm 1, one example per row.

    Also returns the smallest non-zero gap of any loss comparison it made: a
    float32 run takes the same decisions only if no comparison is a near tie.
    """
    x, noise = x.astype(np.float64), noise.astype(np.float64)
    proj = lambda v: ref.clip(v, x, eps)  # noqa: E731
    checks = _paper_checkpoints(steps)
    xk = proj(x + noise)
    f, g, z = _np_loss_grad(params, xk, y, loss, targets)
    robust = z.argmax(1) == y
    x_mis = xk.copy()
    x_prev = xk.copy()
    f_prev = f.copy()
    x_max, g_max, f_max = xk.copy(), g.copy(), f.copy()
    eta = np.full(len(y), 2.0 * eps)
    eta_last, f_max_last, last, successes = eta.copy(), f_max.copy(), 0, np.zeros(len(y))
    gaps = []
    for k in range(1, steps + 1):
        a = 1.0 if k == 1 else alpha
        zk = proj(xk + eta[:, None] * np.sign(g))
        x_new = proj(xk + a * (zk - xk) + (1 - a) * (xk - x_prev))
        f_new, g_new, z_new = _np_loss_grad(params, x_new, y, loss, targets)
        wrong = z_new.argmax(1) != y
        x_mis[wrong] = x_new[wrong]
        robust &= ~wrong
        gaps += [f_new - f_prev, f_new - f_max]
        successes += f_new > f_prev
        better = f_new > f_max
        x_max[better], g_max[better], f_max[better] = x_new[better], g_new[better], f_new[better]
        x_prev, xk, g, f_prev = xk, x_new, g_new, f_new
        if k in checks:
            gaps.append(f_max - f_max_last)
            cond1 = successes < rho * (k - last)
            cond2 = (eta == eta_last) & (f_max == f_max_last)
            eta_last, f_max_last = eta.copy(), f_max.copy()
            h = cond1 | cond2
            eta[h] /= 2
            xk, g, f_prev = xk.copy(), g.copy(), f_prev.copy()
            xk[h], g[h], f_prev[h] = x_max[h], g_max[h], f_max[h]
            successes[:], last = 0, k
    gaps = np.abs(np.concatenate(gaps))
    return np.where(robust[:, None], x_max, x_mis), robust, eta, gaps[gaps > 0].min()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", ["ce", "dlr_targeted"])
def test_apgd_matches_numpy_reference(mlp, mode, loss):
    params, x, y, fn = mlp
    eps, steps = 0.1, 12
    noise = np.random.RandomState(5).uniform(-eps, eps, x.shape).astype(np.float32)
    _, z = _mlp_np(params, x)
    targets = np.argsort(-(z - 1e9 * ref.onehot(y, C)), axis=1)[:, 0]
    tt = tf.constant(targets) if loss != "ce" else None
    out = run_in_mode(lambda: attacks.apgd(fn, x, y, eps, steps, loss=loss, targets=tt,
                                      init_noise=noise), mode)
    x_ref, robust_ref, eta_ref, gap = _np_apgd(params, x, y, eps, steps, noise, loss,
                                               targets)
    assert gap > 1e-6  # no near ties: float32 must decide as float64 does
    np.testing.assert_allclose(out.step_size.numpy(), eta_ref, rtol=1e-6)
    assert len(np.unique(eta_ref)) >= 3  # examples took different step-size paths
    np.testing.assert_array_equal(out.robust.numpy() > 0.5, robust_ref)
    assert 0 < robust_ref.sum() < B  # some broken, some not
    np.testing.assert_allclose(out.x_adv.numpy(), x_ref, atol=1e-5)


def test_target_classes_and_dlr_losses():
    z = np.array([[3.0, 1.0, 2.0, 0.5, -1.0], [0.0, 4.0, 1.0, 2.0, 3.0]], np.float32)
    y = np.array([0, 4])
    for rank, expected in [(1, [2, 1]), (2, [1, 3]), (4, [4, 0])]:
        np.testing.assert_array_equal(attacks.target_classes(y, z, rank).numpy(), expected)
    # dlr: -(z_y - max_{i != y} z_i) / (z_1 - z_3)
    np.testing.assert_allclose(attacks.dlr_loss(y, z).numpy(),
                               [-(3 - 2) / (3 - 1), -(3 - 4) / (4 - 2)], rtol=1e-6)
    t = np.array([3, 0])
    np.testing.assert_allclose(attacks.dlr_targeted_loss(y, t, z).numpy(),
                               [-(3 - 0.5) / (3 - 0.5 * (1 + 0.5)),
                                -(3 - 0) / (4 - 0.5 * (2 + 1))], rtol=1e-6)


def test_apgd_halves_at_every_checkpoint_on_a_flat_loss():
    x = np.random.RandomState(0).uniform(0, 1, (4, 3)).astype(np.float32)
    flat = lambda v: tf.zeros([tf.shape(v)[0], 5]) + 0.0 * v[:, :1]  # noqa: E731
    out = attacks.apgd(flat, x, np.zeros(4, np.int64), 0.2, 100, seed=1)
    np.testing.assert_allclose(out.step_size.numpy(), 0.4 / 2 ** 8)


def test_example_noise_depends_only_on_seed_and_index():
    seed = tf.constant([7, 0], tf.int32)
    noise = ev.example_noise([3, 2, 2], 0.1, seed, tf.constant([5, 9, 2], tf.int64))
    for row, i in enumerate([5, 9, 2]):
        expected = ref.uniform((2, 2), ref.fold_in([7, 0], i), -0.1, 0.1)
        np.testing.assert_allclose(noise.numpy()[row], expected, atol=1e-7)


# ----------------------------------------------------------------------------
# Attacks and reports on a trained MNIST model
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ev.ATTACKS)
def test_adversarial_examples_stay_in_ball(model, mnist, attack):
    _, _, _, xt, yt = mnist
    x, y = xt[:96], yt[:96]
    x_adv, robust = ev.adversarial_examples(model, x, y, EPS, attack, steps=10,
                                            batch_size=40)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert np.abs(x_adv - x).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    pred = model.predict(x_adv, verbose=0).argmax(1)
    # Broken examples come with a misclassified point; robust ones with a
    # correctly classified one (fgsm/pgd judge exactly that point).
    assert np.all(pred[~robust] != y[~robust])
    assert np.all(pred[robust] == y[robust])
    assert 0 < robust.mean() < 1


@pytest.mark.slow  # five attacks at two epsilons on 300 images
def test_evaluate_report_and_attack_ordering(model, mnist):
    _, _, _, xt, yt = mnist
    x, y = xt[:300], yt[:300]
    report = ev.evaluate(model, x, y, [0.05, EPS],
                         attacks=("fgsm", "pgd", "pgd_margin", "apgd_ce", "apgd_t"),
                         apgd_targets=3, seed=1)
    assert set(report) >= {"clean_accuracy", "robust_accuracy", "attacks", "epsilons",
                           "num_examples", "settings", "seconds",
                           "images_per_second", "warnings"}
    assert report["num_examples"] == 300 and report["epsilons"] == [0.05, EPS]
    assert report["settings"]["pgd_steps"] == 20 and report["settings"]["seed"] == 1
    assert report["warnings"] == []
    one = 1.0 / len(x)
    for key in ("0.05", str(EPS)):
        accs = report["attacks"][key]
        worst = report["robust_accuracy"][key]
        assert set(accs) == {"fgsm", "pgd", "pgd_margin", "apgd_ce", "apgd_t"}
        assert all(worst <= a for a in accs.values())
        assert all(a <= report["clean_accuracy"] for a in accs.values())
        assert accs["apgd_ce"] <= accs["pgd"] + one
        assert accs["pgd"] <= accs["fgsm"] + one
    assert report["robust_accuracy"][str(EPS)] < report["robust_accuracy"]["0.05"]
    table = ev.format_table(report)
    assert "worst case" in table and "apgd_t" in table


@pytest.mark.slow  # two evaluate() runs with APGD
def test_autoattack_lite_equals_apgd_ce_and_apgd_t(model, mnist):
    _, _, _, xt, yt = mnist
    x, y = xt[300:500], yt[300:500]
    kw = dict(apgd_steps=30, apgd_targets=2, seed=3)
    lite = ev.evaluate(model, x, y, EPS, attacks="autoattack_lite", batch_size=64, **kw)
    both = ev.evaluate(model, x, y, EPS, attacks=("apgd_ce", "apgd_t"), **kw)
    assert set(lite["attacks"][str(EPS)]) == {"autoattack_lite", "apgd_ce"}
    # Random starts are keyed on example indices: the batch size and which
    # examples are still attacked do not change the result.
    assert abs(lite["robust_accuracy"] - both["robust_accuracy"]) <= 1 / len(x)
    assert lite["attacks"][str(EPS)]["apgd_ce"] == both["attacks"][str(EPS)]["apgd_ce"]
    assert lite["robust_accuracy"] <= lite["attacks"][str(EPS)]["apgd_ce"]


def test_graph_mode_reuses_a_batch_shape_up_to_ten_percent_larger(model, mnist, monkeypatch):
    """Each new batch shape costs a compilation of the fused XLA clusters, so
    a batch of 37 or 38 runs padded to the 40 already run (37 * 1.1 >= 40), 35
    gets its own shape (35 * 1.1 < 40), 40 reuses 40; a padded batch's
    verdicts are those of the same examples unpadded, and the padding rows
    are dropped (one verdict per example)."""
    _, _, _, xt, yt = mnist
    x, y = xt[:40], yt[:40]
    seen = []
    batch_fn = ev._batch_fn

    def spy(*args, **kwargs):
        fn = batch_fn(*args, **kwargs)

        def counted(xb, *rest):
            seen.append(int(xb.shape[0]))
            return fn(xb, *rest)
        return counted

    monkeypatch.setattr(ev, "_batch_fn", spy)
    runner = ev._Runner(model, x, y, batch_size=64, seed=3, jit=False, progress=False)
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    fresh = ev._Runner(twin, x, y, batch_size=64, seed=3, jit=False, progress=False)
    sizes = (40, 37, 38, 35, 40)
    verdicts = [runner.run("pgd", np.arange(n), EPS, 5) for n in sizes]
    assert seen == [40, 40, 40, 35, 40]
    assert [len(v) for v in verdicts] == list(sizes)
    seen.clear()
    unpadded = fresh.run("pgd", np.arange(37), EPS, 5)  # a new model: its own cache
    assert seen == [37]
    np.testing.assert_array_equal(verdicts[1], unpadded)
    np.testing.assert_array_equal(verdicts[1], verdicts[0][:37])
    # Batches are balanced: 100 examples at batch_size 64 run as 50 + 50, not 64 + 36.
    seen.clear()
    x, y = xt[:100], yt[:100]
    runner = ev._Runner(model, x, y, batch_size=64, seed=3, jit=False, progress=False)
    assert len(runner.run("pgd", np.arange(100), EPS, 5)) == 100
    assert seen == [50, 50]


def test_restarts_never_weaker_and_robust_accuracy_helper(model, mnist):
    _, _, _, xt, yt = mnist
    x, y = xt[:200], yt[:200]
    one = ev.robust_accuracy(model, x, y, EPS, "pgd", steps=5, seed=2)
    cache_size = len(ev._cache_for(model))
    again = ev.robust_accuracy(model, x, y, EPS, "pgd", steps=5, seed=2)
    assert again == one and len(ev._cache_for(model)) == cache_size  # no retrace
    three = ev.robust_accuracy(model, x, y, EPS, "pgd", steps=5, restarts=3, seed=2)
    assert three <= one
    report = ev.evaluate(model, x, y, EPS, attacks=("pgd",), pgd_steps=5, seed=2)
    assert report["robust_accuracy"] == one


@pytest.mark.slow  # two evaluate() runs, one compiled with XLA
def test_xla_and_batch_size_do_not_change_results(model, mnist):
    _, _, _, xt, yt = mnist
    x, y = xt[:100], yt[:100]
    kw = dict(attacks=("pgd", "apgd_ce"), pgd_steps=5, apgd_steps=10, seed=4)
    graph = ev.evaluate(model, x, y, EPS, batch_size=64, **kw)
    xla = ev.evaluate(model, x, y, EPS, batch_size=48, jit_compile=True, **kw)
    for name in ("pgd", "apgd_ce"):
        assert abs(graph["attacks"][str(EPS)][name] - xla["attacks"][str(EPS)][name]) <= 0.01
    assert xla["settings"]["jit_compile"] is True


def test_evaluate_rejects_bad_arguments(model, mnist):
    _, _, _, xt, yt = mnist
    x, y = xt[:8], yt[:8]
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        ev.evaluate(model, x, y, EPS, attacks=("pgd", "nope"))
    with pytest.raises(ValueError, match="epsilon"):
        ev.evaluate(model, x, y, [0.1, -1.0])
    with pytest.raises(ValueError, match="pgd_steps"):
        ev.evaluate(model, x, y, EPS, pgd_steps=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.evaluate(model, x * 255, y, EPS)
    with pytest.raises(ValueError, match="labels"):
        ev.evaluate(model, x, y + 10, EPS)
    three = lambda v: model(v, training=False)[:, :3]  # noqa: E731
    with pytest.raises(ValueError, match="apgd_t needs >= 4 classes"):
        ev.evaluate(three, x, np.minimum(y, 2), EPS, attacks="autoattack_lite")


# ----------------------------------------------------------------------------
# Sanity checks
# ----------------------------------------------------------------------------
def test_sanity_checks_silent_on_normal_model(model, mnist):
    _, _, _, xt, yt = mnist
    assert ev.sanity_checks(model, xt[:200], yt[:200], {}) == []


def test_sanity_checks_fire_on_softmax_output(model, mnist):
    _, _, _, xt, yt = mnist
    probs = keras.Sequential([keras.Input((28, 28, 1)), model, keras.layers.Softmax()])
    warnings = ev.sanity_checks(probs, xt[:200], yt[:200], {})
    assert len(warnings) == 1 and "probabilities" in warnings[0]


@pytest.mark.parametrize("kind", ["temperature", "rounding"])
def test_sanity_checks_fire_on_gradient_masking(model, mnist, kind):
    _, _, _, xt, yt = mnist
    if kind == "temperature":  # saturated softmax: CE gradients underflow to 0
        masked = lambda v: 1e6 * model(v, training=False)  # noqa: E731
    else:  # input quantisation: tf.round has no gradient
        masked = lambda v: model(tf.round(v), training=False)  # noqa: E731
    warnings = ev.sanity_checks(masked, xt[:200], yt[:200], {})
    assert any("gradient masking" in w for w in warnings), warnings
    report = ev.evaluate(masked, xt[:100], yt[:100], EPS, attacks=("pgd",), pgd_steps=5)
    assert any("gradient masking" in w for w in report["warnings"])


def test_sanity_checks_on_inconsistent_reports():
    def report(attacks, robust, clean=0.9):
        return {"clean_accuracy": clean, "epsilons": [float(k) for k in attacks],
                "attacks": attacks, "robust_accuracy": robust}

    fine = report({"0.1": {"fgsm": 0.5, "pgd": 0.4, "apgd_ce": 0.395},
                   "0.2": {"fgsm": 0.3, "pgd": 0.2, "apgd_ce": 0.2}},
                  {"0.1": 0.39, "0.2": 0.2})
    assert ev.sanity_checks(None, None, None, fine) == []
    above_clean = report({"0.1": {"pgd": 0.95}}, 0.95)
    assert any("above the clean" in w for w in ev.sanity_checks(None, None, None, above_clean))
    fgsm_wins = report({"0.1": {"fgsm": 0.3, "pgd": 0.5}}, 0.3)
    assert any("fgsm beats pgd" in w for w in ev.sanity_checks(None, None, None, fgsm_wins))
    apgd_weak = report({"0.1": {"pgd": 0.3, "apgd_ce": 0.35}}, 0.3)
    assert any("apgd_ce is weaker than pgd" in w
               for w in ev.sanity_checks(None, None, None, apgd_weak))
    rising = report({"0.1": {"pgd": 0.3}, "0.2": {"pgd": 0.5}}, {"0.1": 0.3, "0.2": 0.5})
    found = ev.sanity_checks(None, None, None, rising)
    assert any("rises with epsilon" in w and w.startswith("pgd") for w in found)
    assert any("rises with epsilon" in w and w.startswith("worst case") for w in found)


# ----------------------------------------------------------------------------
# Loading and bin/evaluate
# ----------------------------------------------------------------------------
def test_load_classifier(saved_run, tmp_path):
    m = ev.load_classifier(saved_run)
    assert m.output_shape == (None, 10)
    assert ev.load_classifier(saved_run / "model.keras").output_shape == (None, 10)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ev.load_classifier(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model.keras"):
        ev.load_classifier(tmp_path)
    (tmp_path / "w.h5").write_text("x")
    with pytest.raises(ValueError, match="w.h5"):
        ev.load_classifier(tmp_path / "w.h5")
    (tmp_path / "bad.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="bad.keras"):
        ev.load_classifier(tmp_path / "bad.keras")


def _run(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, str(EVALUATE)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_bin_evaluate_end_to_end(saved_run, mnist, tmp_path):
    data_dir = mnist[0]
    out, plot = tmp_path / "report.json", tmp_path / "acc.png"
    proc = _run([f"--model_path={saved_run}", "--dataset=mnist", f"--data_dir={data_dir}",
                 "--split=test", "--epsilon=0.05,8/255", "--attacks=fgsm,pgd,autoattack_lite",
                 "--pgd_steps=10", "--apgd_steps=20", "--apgd_targets=2",
                 "--num_examples=150", "--batch_size=64", "--seed=1",
                 f"--output={out}", f"--plot={plot}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["num_examples"] == 150
    assert report["epsilons"] == [0.05, 8 / 255]
    assert set(report["attacks"]["0.05"]) == {"fgsm", "pgd", "autoattack_lite", "apgd_ce"}
    assert set(report["robust_accuracy"]) == {"0.05", str(8 / 255)}
    assert report["data"]["dataset"] == "mnist"
    assert "worst case" in proc.stdout and "clean accuracy" in proc.stdout
    assert "[evaluate]" in proc.stderr  # progress lines
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD_FLAGS = [
    (["--epsilon=abc"], "--epsilon"),
    (["--epsilon=0.1,-0.2"], "--epsilon"),
    (["--epsilon=1/0"], "--epsilon"),
    ([], "--epsilon"),
    (["--epsilon=0.1", "--pgd_steps=0"], "--pgd_steps"),
    (["--epsilon=0.1", "--pgd_steps=ten"], "--pgd_steps"),
    (["--epsilon=0.1", "--restarts=-1"], "--restarts"),
    (["--epsilon=0.1", "--num_examples=0"], "--num_examples"),
    (["--epsilon=0.1", "--batch_size=0"], "--batch_size"),
    (["--epsilon=0.1", "--split=dev"], "--split"),
    (["--epsilon=0.1", "--dataset=imagenet"], "--dataset"),
    (["--epsilon=0.1", "--plot=acc.jpg"], "--plot"),
    (["--epsilon=0.1", "--output=/no/such/dir/r.json"], "--output"),
    (["--epsilon=0.1", "--attacks=pgd,cw"], "--attacks"),
]


@pytest.mark.slow  # a bin/evaluate subprocess per case
@pytest.mark.parametrize("args,flag", BAD_FLAGS, ids=[" ".join(a) or "none" for a, _ in BAD_FLAGS])
def test_bin_evaluate_bad_flags(saved_run, mnist, tmp_path, args, flag):
    proc = _run([f"--model_path={saved_run}", f"--data_dir={mnist[0]}"] + args, tmp_path)
    assert proc.returncode == 1
    assert flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # (TensorFlow's C++ start-up lines may precede it when TF was imported.)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("evaluate: error:")]
    assert len(errors) == 1 and flag in errors[0], proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow  # a bin/evaluate subprocess per case
@pytest.mark.parametrize("kind", ["missing", "no_model_in_dir", "not_a_model"])
def test_bin_evaluate_bad_model_path(tmp_path, kind):
    path = {"missing": tmp_path / "nope.keras", "no_model_in_dir": tmp_path,
            "not_a_model": tmp_path / "junk.keras"}[kind]
    (tmp_path / "junk.keras").write_text("junk")
    proc = _run([f"--model_path={path}", "--epsilon=0.1"], tmp_path)
    assert proc.returncode == 1
    assert "--model_path" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------
# Cross-check against Foolbox 3
# ----------------------------------------------------------------------------
@pytest.mark.slow  # our PGD and Foolbox's on 500 images
def test_pgd_agrees_with_foolbox(model, mnist):
    fb = pytest.importorskip("foolbox", reason="foolbox (and eagerpy) not installed")
    _, _, _, xt, yt = mnist
    x, y = xt[:500], yt[:500]
    steps, size = 20, 2.5 * EPS / 20
    ours = ev.robust_accuracy(model, x, y, EPS, "pgd", steps=steps, step_size=size)
    fmodel = fb.TensorFlowModel(model, bounds=(0, 1))
    attack = fb.attacks.LinfPGD(steps=steps, abs_stepsize=size, random_start=True)
    broken = []
    for b in range(0, len(x), 250):
        _, clipped, success = attack(fmodel, tf.constant(x[b:b + 250]),
                                     tf.constant(y[b:b + 250]), epsilons=EPS)
        assert float(tf.reduce_max(tf.abs(clipped - x[b:b + 250]))) <= EPS + 1e-6
        broken.append(success.numpy())
    theirs = 1.0 - np.concatenate(broken).mean()
    assert 0.05 < ours < 0.9  # a meaningful comparison
    print(f"robust accuracy: ours {ours:.4f}, foolbox {theirs:.4f}")
    assert abs(ours - theirs) <= 0.015, (ours, theirs)
