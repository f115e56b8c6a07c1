"""The hash RNG: bit-identical to the NumPy mirror in every mode."""

import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from conftest import MODES, run_in_mode

from tf_backsmooth import rng


@pytest.mark.parametrize("mode", MODES)
def test_uniform_matches_numpy_mirror_in_every_mode(mode):
    seed = tf.constant([12345, -678], tf.int32)
    # The hash bits are identical; the affine map may differ by 1 ulp (XLA fuses
    # it into an FMA).
    bits = run_in_mode(lambda: rng._unit([4, 7, 3], seed, tf.float32), mode)
    np.testing.assert_array_equal(bits.numpy(), ref._unit((4, 7, 3), [12345, -678]).astype(np.float32))
    got = run_in_mode(lambda: rng.uniform([4, 7, 3], seed, -0.3, 0.3), mode)
    np.testing.assert_allclose(got.numpy(), ref.uniform((4, 7, 3), [12345, -678], -0.3, 0.3),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_fold_in_and_normal_match_numpy_mirror(mode):
    seed = tf.constant([5, 9], tf.int32)
    folded = run_in_mode(lambda: rng.fold_in(seed, 1000003), mode)
    np.testing.assert_array_equal(folded.numpy(), ref.fold_in([5, 9], 1000003))
    got = run_in_mode(lambda: rng.normal([64], seed), mode)
    np.testing.assert_allclose(got.numpy(), ref.normal((64,), [5, 9]), rtol=1e-5, atol=1e-5)


def test_statistics_and_independence():
    u = rng.uniform([200_000], 3).numpy()
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - np.sqrt(1 / 12)) < 0.005
    n = rng.normal([200_000], 3).numpy()
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1.0) < 0.01
    # Different seeds / folds give uncorrelated streams.
    v = rng.uniform([200_000], rng.fold_in(3, 1)).numpy()
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.01
    # Consecutive elements are uncorrelated.
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_fold_in_distinct_for_steps_and_replicas():
    seeds = {tuple(rng.fold_in(rng.fold_in(0, step), rep).numpy())
             for step in range(50) for rep in range(4)}
    assert len(seeds) == 200


def test_int_seed_equals_pair_and_bad_dtype_rejected():
    np.testing.assert_array_equal(rng.uniform([5], 7).numpy(), rng.uniform([5], [7, 0]).numpy())
    with pytest.raises(TypeError, match="integer"):
        rng.make_seed(tf.constant([1.0, 2.0]))


def test_fgsm_rs_starts_behave_like_iid_uniform_draws():
    """The random starts a training run draws (FGSM-RS): step k's
    start is U(-eps, eps) keyed on RobustModel.step_seed(k) and the attack
    stream. Checked as one would check PyTorch's ``uniform_`` or NumPy's:
    moments, and no linear structure across steps, examples or pixels (every
    off-diagonal cosine of the Gram matrices is as small as for independent
    vectors). Swapping this stream for NumPy's did not change how often Wong
    et al.'s recipe collapses (01fcd3f, 736e084; docs/GUIDE.md, lessons learned)."""
    eps, steps, batch, pixels = 0.3, 40, 100, 784

    @tf.function
    def start(k):
        seed = rng.fold_in(rng.fold_in(rng.fold_in(tf.constant([0, 0]), k), 0),
                           rng.TRAIN_ATTACK)
        return rng.uniform([batch, pixels], seed, -eps, eps)

    a = np.stack([start(tf.constant(k)).numpy() for k in range(steps)]).astype(np.float64)
    assert abs(a.mean()) < 1e-3 and abs(a.std() - eps / np.sqrt(3)) < 1e-3
    assert -eps < a.min() and a.max() < eps

    def off_diagonal(vectors):
        v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        gram = v @ v.T
        return gram[~np.eye(len(v), dtype=bool)], 1 / np.sqrt(v.shape[1])

    for vectors in (a.reshape(steps, -1),               # whole steps
                    a.reshape(-1, pixels)[:2000],       # examples
                    a.reshape(-1, pixels).T):           # pixel positions
        off, expected = off_diagonal(vectors)
        assert abs(off.std() / expected - 1) < 0.1
        assert np.abs(off).max() < 6.5 * expected
