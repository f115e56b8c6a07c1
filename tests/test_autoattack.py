"""AutoAttack's other two attacks, Square and FAB-T: each against an
independent float64 NumPy implementation in eager, graph and XLA mode; Square
on a model whose gradient is masked (where PGD fails and Square does not);
both through evaluate() and bin/evaluate.
"""

import json
import math
import subprocess
import sys

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from conftest import MODES, REPO, run_in_mode

from tf_backsmooth import attacks
from tf_backsmooth import evaluation as ev

THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


# ----------------------------------------------------------------------------
# Independent reference: one example at a time, float64, from the paper and
# AutoAttack's description; random numbers from the NumPy mirror of rng.py.
# ----------------------------------------------------------------------------
def _fraction(i, n_queries, p_init=0.8):
    r = int(i / n_queries * 10000)
    return p_init / 2 ** sum(r > t for t in THRESHOLDS)


def _draws(seed, it, index, n):
    return ref.uniform([n], ref.fold_in(ref.fold_in(ref.seed_pair(seed), it), index))


def np_square(x, y, W, b, eps, n_queries, seed, index, p_init=0.8):
    """Returns (x_adv float64, robust bool, smallest non-zero decision gap)."""
    _, H, Wd, C = x.shape
    W, b = W.astype(np.float64), b.astype(np.float64)

    def margin(img, label):
        z = img.reshape(-1) @ W + b
        return z[label] - np.max(np.delete(z, label))

    outs, robust, gap = [], [], np.inf
    for x0, label, idx in zip(x.astype(np.float64), y, index):
        clip = lambda v: np.clip(np.clip(v, x0 - eps, x0 + eps), 0.0, 1.0)  # noqa: E731
        signs = np.where(_draws(seed, 0, idx, Wd * C) < 0.5, -1.0, 1.0)
        best_x = clip(x0 + eps * signs.reshape(1, Wd, C))
        best = margin(best_x, label)
        for i in range(n_queries):
            if best <= 0:
                break
            side = int(round(math.sqrt(_fraction(i, n_queries, p_init) * H * Wd)))
            side = min(max(side, 1), min(H, Wd))
            u = _draws(seed, i + 1, idx, 2 + C)
            top = int(np.floor(np.float32(H - side) * u[0]))
            left = int(np.floor(np.float32(Wd - side) * u[1]))
            cand = best_x.copy()
            cand[top:top + side, left:left + side, :] += 2 * eps * np.where(u[2:] < 0.5, -1.0, 1.0)
            cand = clip(cand)
            new = margin(cand, label)
            if np.abs(cand - best_x).max() > 1e-6:  # not the same point up to rounding
                gap = min(gap, abs(new - best))
            if new < best:
                best_x, best = cand, new
        outs.append(best_x)
        robust.append(best > 0)
    return np.stack(outs), np.array(robust), gap


def _linear(seed=0, shape=(6, 5, 2), classes=4, n=12):
    rs = np.random.RandomState(seed)
    d = int(np.prod(shape))
    W = (rs.randn(d, classes) * 0.3).astype(np.float32)
    b = (rs.randn(classes) * 0.1).astype(np.float32)
    x = rs.rand(n, *shape).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ W + b, axis=1)  # correct at the clean input
    fn = lambda v: tf.reshape(v, [tf.shape(v)[0], -1]) @ W + b  # noqa: E731
    return fn, W, b, x, y


def test_fraction_and_size_follow_the_reference_schedule():
    for n in (100, 1000, 5000):
        for i in range(0, n, 7):
            assert attacks.square_fraction(i, n).numpy() == _fraction(i, n), (i, n)
    # AutoAttack's constants: 5000 queries, p_init 0.8, MNIST -> side 25 at first.
    assert int(attacks.square_size(attacks.square_fraction(0, 5000), 28, 28)) == 25
    assert attacks.square_fraction(4999, 5000).numpy() == 0.8 / 512
    assert int(attacks.square_size(0.8 / 512, 28, 28)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_square_matches_numpy_reference(mode):
    fn, W, b, x, y = _linear()
    eps, queries, seed = 0.08, 150, 3
    index = np.arange(40, 40 + len(x))
    x_adv, robust = run_in_mode(
        lambda: attacks.square(fn, x, y, eps, n_queries=queries, seed=seed,
                               index=index), mode)
    x_ref, robust_ref, gap = np_square(x, y, W, b, eps, queries, seed, index)
    assert gap > 1e-5  # no near ties: float32 must decide as float64 does
    assert 0 < robust_ref.sum() < len(x)  # some broken, some not: a real test
    np.testing.assert_array_equal(robust.numpy() > 0.5, robust_ref)
    np.testing.assert_allclose(x_adv.numpy(), x_ref, atol=1e-6)
    assert np.abs(x_adv.numpy() - x).max() <= eps + 1e-6
    assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0


def test_square_result_does_not_depend_on_the_batch():
    fn, _, _, x, y = _linear(seed=1)
    full, rob = attacks.square(fn, x, y, 0.08, n_queries=80, seed=5,
                               index=np.arange(len(x)))
    part = [2, 7, 9]
    sub, sub_rob = attacks.square(fn, x[part], y[part], 0.08, n_queries=80, seed=5,
                                  index=np.array(part))
    np.testing.assert_array_equal(sub.numpy(), full.numpy()[part])
    np.testing.assert_array_equal(sub_rob.numpy(), rob.numpy()[part])


# ----------------------------------------------------------------------------
# Gradient masking: a model that quantises its input has a zero gradient
# ----------------------------------------------------------------------------
class Quantised(keras.Model):
    """Rounds the input to 1/8 before a linear layer: its input gradient is zero."""

    def __init__(self, W, b):
        super().__init__()
        self.W, self.b = tf.constant(W), tf.constant(b)

    def call(self, x, training=False):
        q = tf.round(x * 8.0) / 8.0
        return tf.reshape(q, [tf.shape(x)[0], -1]) @ self.W + self.b


def _masked_problem():
    rs = np.random.RandomState(0)
    W = (rs.randn(64, 10) * 0.5).astype(np.float32)
    b = np.zeros(10, np.float32)
    x = rs.rand(64, 8, 8, 1).astype(np.float32)
    model = Quantised(W, b)
    y = np.argmax(model(x).numpy(), axis=1)
    return model, x, y


def test_square_breaks_a_masked_gradient_model_that_pgd_cannot():
    model, x, y = _masked_problem()
    report = ev.evaluate(model, x, y, 0.2, attacks=("pgd", "apgd_ce", "square"),
                         pgd_steps=20, apgd_steps=20, square_queries=300)
    acc = report["attacks"]["0.2"]
    assert report["clean_accuracy"] == 1.0
    assert acc["pgd"] >= 0.9 and acc["apgd_ce"] >= 0.9  # the gradient is zero
    assert acc["square"] <= 0.3  # the random search does not need it
    assert report["robust_accuracy"] == pytest.approx(acc["square"])
    beyond = report["square_beyond_gradient"]["0.2"]
    assert beyond >= 0.6
    assert any("square (gradient-free) breaks" in w for w in report["warnings"])
    assert "square" in report["attack_seconds"]["0.2"]
    assert report["settings"]["square_queries"] == 300


def test_no_masking_warning_when_square_adds_nothing():
    fn, _, _, x, y = _linear(seed=2, n=32)
    report = ev.evaluate(fn, x, y, 0.3, attacks=("pgd", "square"), pgd_steps=20,
                         square_queries=100)
    acc = report["attacks"]["0.3"]
    assert acc["pgd"] == 0.0  # a linear model at a large eps: PGD breaks all
    assert report["square_beyond_gradient"]["0.3"] == 0.0
    assert not any("square" in w for w in report["warnings"])


def test_square_alone_has_no_beyond_gradient_entry():
    fn, _, _, x, y = _linear(seed=2, n=16)
    report = ev.evaluate(fn, x, y, 0.05, attacks="square", square_queries=50)
    assert "square_beyond_gradient" not in report
    assert 0.0 <= report["attacks"]["0.05"]["square"] <= report["clean_accuracy"]


def test_square_queries_must_be_positive():
    fn, _, _, x, y = _linear()
    with pytest.raises(ValueError, match="square_queries"):
        ev.evaluate(fn, x, y, 0.05, attacks="square", square_queries=0)


@pytest.mark.slow  # a bin/evaluate subprocess
def test_bin_evaluate_runs_square_alone(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.save(tmp_path / "model.keras")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bin" / "evaluate"), f"--model_path={tmp_path}",
         "--dataset=fashion_mnist", "--epsilon=0.1", "--attacks=square",
         "--square_queries=20", "--num_examples=32", "--progress=false",
         f"--output={out}"], capture_output=True, text=True, timeout=300)
    if "not found" in proc.stderr and "fashion" in proc.stderr.lower():
        pytest.skip("Fashion-MNIST not installed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["square_queries"] == 20
    assert "square" in report["attacks"]["0.1"]
    # The CPU kernel choice is recorded and printed (tf_backsmooth.cpu).
    assert report["cpu_kernels"]["onednn"]["in_use"] in (True, False)
    assert "oneDNN kernels o" in proc.stdout
    bad = subprocess.run(
        [sys.executable, str(REPO / "bin" / "evaluate"), f"--model_path={tmp_path}",
         "--dataset=fashion_mnist", "--epsilon=0.1", "--attacks=square",
         "--square_queries=0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "square_queries" in bad.stderr + bad.stdout


# ----------------------------------------------------------------------------
# FAB-T: the L-inf projection and the attack against float64 references
# ----------------------------------------------------------------------------
def np_project(t, w, b):
    """Smallest L-inf move onto <w, .> = b inside [0, 1], by walking the breakpoints.

    Written from the problem, not from FAB's code: moving coordinate i by at
    most lam in the helpful direction changes <w, .> by |w_i| min(lam, room_i);
    on each segment between sorted rooms that change is linear in lam.
    """
    t, w = t.astype(np.float64), w.astype(np.float64)
    out = np.zeros_like(t)
    for r in range(len(t)):
        need = b[r] - w[r] @ t[r]
        direction = np.sign(w[r]) * np.sign(need)
        # moving along `direction` changes <w, .> towards b
        room = np.where(direction > 0, 1 - t[r], t[r])
        room[w[r] == 0] = 0.0
        order = np.argsort(room)
        a = np.abs(w[r])
        done, lam = 0.0, None
        prev = 0.0
        for k, i in enumerate(order):
            rest = a[order[k:]].sum()  # coordinates still moving with lam
            if rest > 0 and done + rest * (room[i] - prev) >= abs(need):
                lam = prev + (abs(need) - done) / rest
                break
            done += rest * (room[i] - prev)
            prev = room[i]
        step = room if lam is None else np.minimum(lam, room)
        out[r] = direction * step * (w[r] != 0)
    return out


@pytest.mark.parametrize("dtype, atol", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_linf_projection_matches_reference(dtype, atol):
    """The bisection on lam against the reference's sort of the breakpoints:
    float64 to 1e-12, so the exact solve on the last bracket is exact."""
    rs = np.random.RandomState(0)
    n, dim = 40, 30
    t = rs.rand(n, dim).astype(dtype)
    t[:, :4] = np.round(t[:, :4])  # coordinates already at a bound
    t[:, 7:9] = t[:, 9:10]  # tied breakpoints
    w = rs.randn(n, dim).astype(dtype)
    w[:, 4:7] = 0.0  # coordinates the hyperplane does not see
    b = (w * t).sum(1) + rs.randn(n).astype(dtype) * np.linspace(0.1, 8, n).astype(dtype)
    b[0] = (w[0] * t[0]).sum()  # already on the hyperplane: no move
    d = attacks.project_onto_hyperplane_linf(tf.constant(t), tf.constant(w), tf.constant(b)).numpy()
    d_ref = np_project(t, w, b)
    np.testing.assert_allclose(d, d_ref, atol=atol)
    np.testing.assert_allclose(d[0], 0.0, atol=atol)
    reach = np.abs((w.astype(np.float64) * (t + d_ref)).sum(1) - b) < 1e-4
    assert 5 < reach.sum() < n  # both cases: the hyperplane reached, and out of reach
    assert np.all((t + d >= -1e-6) & (t + d <= 1 + 1e-6))



def test_linf_projection_refinement_steps_are_exact_from_any_bracket(monkeypatch):
    """The linear solves after the bisection never overshoot and each crosses
    at least one breakpoint: from a coarse bracket (4 bisections) enough of
    them reach the exact step in float64; without them the coarse step is off."""
    rs = np.random.RandomState(1)
    n, dim = 40, 30
    t = rs.rand(n, dim)
    t[:, :4] = np.round(t[:, :4])
    w = rs.randn(n, dim)
    b = (w * t).sum(1) + rs.randn(n) * np.linspace(0.1, 8, n)
    d_ref = np_project(t, w, b)
    args = [tf.constant(a) for a in (t, w, b)]
    monkeypatch.setitem(attacks.PROJECTION_BISECTIONS, 8, 4)
    monkeypatch.setattr(attacks, "PROJECTION_REFINEMENTS", 0)
    coarse = attacks.project_onto_hyperplane_linf(*args).numpy()
    assert np.abs(coarse - d_ref).max() > 1e-3
    monkeypatch.setattr(attacks, "PROJECTION_REFINEMENTS", dim)
    np.testing.assert_allclose(attacks.project_onto_hyperplane_linf(*args).numpy(),
                               d_ref, atol=1e-12)


D2, H2, C2 = 24, 16, 5


def _mlp2(seed=3, n=16, dtype=np.float64):
    rs = np.random.RandomState(seed)
    W1 = rs.randn(D2, H2).astype(dtype)
    b1 = (rs.randn(H2) * 0.5).astype(dtype)
    W2 = rs.randn(H2, C2).astype(dtype)
    b2 = (rs.randn(C2) * 0.1).astype(dtype)
    x = rs.rand(n, D2).astype(dtype)
    params = [p.astype(np.float64) for p in (W1, b1, W2, b2)]
    y = np.argmax(np.tanh(x @ params[0] + params[1]) @ params[2] + params[3], 1)
    fn = lambda v: tf.tanh(v @ W1 + b1) @ W2 + b2  # noqa: E731
    return params, x, y, fn


def np_fab_t(params, x, y, eps, rank, steps, alpha_max=0.1, eta=1.05, beta=0.9):
    """FAB-T from Croce & Hein (2020), Algorithm 1 (targeted), float64, batched."""
    W1, b1, W2, b2 = params

    def logits(v):
        return np.tanh(v @ W1 + b1) @ W2 + b2

    x = x.astype(np.float64)
    n = np.arange(len(x))
    target = np.argsort(-logits(x), axis=1, kind="stable")[:, rank]
    x1, best_x, best = x.copy(), x.copy(), np.full(len(x), 1e10)
    closest = np.inf  # smallest |top - second| logit gap at a decision
    for _ in range(steps):
        h = np.tanh(x1 @ W1 + b1)
        z = h @ W2 + b2
        value = z[n, target] - z[n, y]
        grad = ((W2[:, target] - W2[:, y]).T * (1 - h ** 2)) @ W1.T
        bias = -value + (grad * x1).sum(1)
        d1 = np_project(x1, grad, bias)
        d2 = np_project(x, grad, bias)
        a1 = np.maximum(np.abs(d1).max(1, keepdims=True), 1e-8)
        a2 = np.maximum(np.abs(d2).max(1, keepdims=True), 1e-8)
        alpha = np.minimum(np.maximum(a1 / (a1 + a2), 0), alpha_max)
        x1 = np.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0, 1)
        z = logits(x1)
        srt = np.sort(z, 1)
        closest = min(closest, (srt[:, -1] - srt[:, -2]).min())
        wrong = z.argmax(1) != y
        norm = np.abs(x1 - x).max(1)
        better = wrong & (norm < best)
        best_x[better], best[better] = x1[better], norm[better]
        x1[wrong] = x[wrong] + (x1[wrong] - x[wrong]) * beta
    return best_x, ~(best <= eps), best, closest


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [1, 3])
def test_fab_targeted_matches_numpy_reference(mode, rank):
    """Run in float64: FAB's iterates sit on the decision boundary by design
    (logit gaps of 1e-6 are common), so only a float64 run decides every
    misclassification as the float64 reference does."""
    params, x, y, fn = _mlp2()
    eps, steps = 0.08, 15
    x_adv, robust = run_in_mode(
        lambda: attacks.fab_targeted(fn, x, y, eps, target_rank=rank, steps=steps), mode)
    x_ref, robust_ref, norms, _ = np_fab_t(params, x, y, eps, rank, steps)
    assert np.all(np.abs(norms[norms < 1e10] - eps) > 1e-6)  # no tie at the threshold
    assert 0 < robust_ref.sum() < len(x)  # some found within eps, some not
    np.testing.assert_array_equal(robust.numpy() > 0.5, robust_ref)
    # broken: the reference's closest misclassified point; robust: the clean input
    expected = np.where(robust_ref[:, None], x, x_ref)
    np.testing.assert_allclose(x_adv.numpy(), expected, atol=1e-9)
    assert np.any(robust_ref & (norms < 1e10))  # some found beyond eps: returned as x


def test_fab_targeted_in_float32_finds_close_misclassified_points():
    params, x, y, fn = _mlp2(dtype=np.float32, n=48)
    eps = 0.08
    x_adv, robust = attacks.fab_targeted(fn, x, y, eps, target_rank=1, steps=30)
    _, robust_ref, _, _ = np_fab_t(params, x, y, eps, 1, 30)
    x_adv, broken = x_adv.numpy(), robust.numpy() < 0.5
    assert broken.sum() >= 10
    assert np.all(np.abs(x_adv - x).max(1)[broken] <= eps + 1e-6)
    # Judged by the same TensorFlow ops the attack used: FAB's points sit on the
    # boundary (logit gaps of 1e-6), where NumPy's own float32 matmul (another
    # BLAS kernel, e.g. with OPENBLAS_CORETYPE set) can round the other way.
    logits = fn(tf.convert_to_tensor(x_adv)).numpy()
    assert np.all(logits[broken].argmax(1) != y[broken])
    assert abs(int(broken.sum()) - int((~robust_ref).sum())) <= 2  # float32 vs float64


# ----------------------------------------------------------------------------
# The autoattack preset
# ----------------------------------------------------------------------------
def _trained_mlp(n=160):
    rs = np.random.RandomState(0)
    x = rs.rand(n, 8, 8, 1).astype(np.float32)
    y = (x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(np.int64) * 3 \
        + (x[:, :, :4].mean((1, 2, 3)) > 0.5).astype(np.int64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(5)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    return model, x, y


def test_autoattack_preset_runs_each_part_on_what_is_left():
    model, x, y = _trained_mlp()
    kw = dict(apgd_steps=10, apgd_targets=3, fab_steps=10, square_queries=60)
    report = ev.evaluate(model, x, y, 0.05, attacks=("autoattack_lite", "autoattack"), **kw)
    acc = report["attacks"]["0.05"]
    stages = report["preset_stages"]["0.05"]
    assert [st["attack"] for st in stages["autoattack"]] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    # the shared parts are the same runs (per-example results, reused)
    assert stages["autoattack"][0]["broken"] == stages["autoattack_lite"][0]["broken"]
    assert stages["autoattack"][1]["broken"] == stages["autoattack_lite"][1]["broken"]
    clean_n = round(report["clean_accuracy"] * len(x))
    broken = sum(st["broken"] for st in stages["autoattack"])
    assert acc["autoattack"] == pytest.approx((clean_n - broken) / len(x))
    assert acc["autoattack"] <= acc["autoattack_lite"] <= acc["apgd_ce"] < report["clean_accuracy"]
    assert stages["autoattack"][-1]["robust_accuracy"] == pytest.approx(acc["autoattack"])
    assert report["square_beyond_gradient"]["0.05"] == stages["autoattack"][-1]["broken"] / len(x)
    table = ev.format_table(report)
    assert "autoattack at eps=0.05: apgd_ce broke" in table and "square broke" in table
    # fab_t alone: a standalone run equals the per-target loop over all clean examples
    alone = ev.evaluate(model, x, y, 0.05, attacks="fab_t", **kw)
    assert 0 <= alone["attacks"]["0.05"]["fab_t"] <= report["clean_accuracy"]


# ----------------------------------------------------------------------------
# attacks.fused: the element-wise parts as XLA clusters, or plain graph code
# ----------------------------------------------------------------------------
def test_fused_parts_give_the_plain_results(monkeypatch):
    """APGD, FAB-T and Square with their element-wise parts compiled by XLA
    (the default) equal the same code without XLA (``FUSE_WITH_XLA=False``).
    FAB-T runs in float64: in float32 a different rounding of the projection
    can pick another iterate on the decision boundary (see the FAB tests)."""
    fn, _, _, x, y = _linear()
    _, x2, y2, fn2 = _mlp2(n=12)  # float64: FAB's iterates sit on the boundary
    outs = {}
    for fuse in (True, False):
        monkeypatch.setattr(attacks, "FUSE_WITH_XLA", fuse)
        compiled = attacks.fused(attacks._apgd_update)
        assert (compiled is attacks._apgd_update) is (not fuse)
        sq = tf.function(lambda: attacks.square(fn, x, y, 0.08, n_queries=60, seed=1))()
        ap = tf.function(lambda: attacks.apgd(fn, x, y, 0.08, steps=12, seed=1))()
        fab = tf.function(lambda: attacks.fab_targeted(fn2, x2, y2, 0.08, steps=10))()
        outs[fuse] = [t.numpy() for t in (sq[0], sq[1], ap.x_adv, ap.robust, fab[0], fab[1])]
    assert 0 < outs[True][1].sum() < len(x)  # Square broke some, not all
    for fused_out, plain_out in zip(outs[True], outs[False]):
        np.testing.assert_allclose(fused_out, plain_out, atol=1e-5)
