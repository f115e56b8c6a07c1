"""Per-example losses against NumPy, and the replica-correct reduction."""

import numpy as np
import pytest
import reference as ref
import tensorflow as tf
from conftest import two_replica_strategy

from tf_backsmooth import objectives


@pytest.fixture
def logits():
    rs = np.random.RandomState(0)
    return rs.randn(6, 4).astype(np.float32) * 3, rs.randn(6, 4).astype(np.float32), rs.randint(0, 4, 6)


def test_cross_entropy_kl_margin_match_numpy(logits):
    z, z2, y = logits
    np.testing.assert_allclose(objectives.cross_entropy(y, z), ref.ce(z, y), rtol=1e-5)
    np.testing.assert_allclose(objectives.kl_divergence(z, z2), ref.kl(z, z2), rtol=1e-4, atol=1e-6)
    expected = np.array([np.max(np.delete(z[i], y[i])) - z[i, y[i]] for i in range(6)])
    np.testing.assert_allclose(objectives.margin_loss(y, z), expected, rtol=1e-6)
    assert np.all((objectives.margin_loss(y, z).numpy() > 0) == (z.argmax(1) != y))


def test_kl_is_exact_for_confident_predictions():
    # Probabilities of 1e-30 would be clipped to 1e-7 by keras' KLDivergence.
    p = np.array([[0.0, -70.0]], np.float32)
    q = np.array([[0.0, 0.0]], np.float32)
    expected = ref.kl(p.astype(np.float64), q.astype(np.float64))
    np.testing.assert_allclose(objectives.kl_divergence(p, q), expected, rtol=1e-5)
    np.testing.assert_allclose(objectives.kl_divergence(q, p)[0], ref.kl(q, p)[0], rtol=1e-5)
    assert objectives.kl_divergence(q, p)[0] > 30  # ~ 0.5 * 70


def test_replica_mean_divides_by_global_batch():
    v = tf.constant([1.0, 2.0, 3.0, 6.0])
    assert float(objectives.replica_mean(v, num_replicas=1)) == pytest.approx(3.0)
    # Two replicas holding 4 examples each: each contributes sum/8.
    assert float(objectives.replica_mean(v, num_replicas=2)) == pytest.approx(1.5)
    w = tf.constant([1.0, 0.0, 1.0, 0.0])
    assert float(objectives.replica_mean(v, w, num_replicas=1)) == pytest.approx(1.0)


def test_replica_mean_uses_strategy_replica_count():
    strategy = two_replica_strategy()
    v = tf.constant([2.0, 4.0])
    per_replica = strategy.run(lambda: objectives.replica_mean(v))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    # Both replicas see [2, 4]: global mean over 4 examples is 3.
    assert float(total) == pytest.approx(3.0)
