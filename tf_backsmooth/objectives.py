"""Per-example losses and the one replica-correct reduction helper.

Every function here returns a vector with one value per example; nothing is
averaged except by :func:`replica_mean`, which every training objective uses so
that the update under a ``tf.distribute`` strategy equals the one-device update
on the global batch.

KL is computed from ``log_softmax`` of logits (never from clipped
probabilities, unlike ``keras.losses.KLDivergence``), so it is exact for
confident predictions and its gradient never vanishes through a clip.
"""

from __future__ import annotations

import tensorflow as tf


def _float32(t):
    """Losses are computed in float32 even under a mixed-precision policy."""
    t = tf.convert_to_tensor(t)
    return tf.cast(t, tf.float32) if t.dtype != tf.float32 else t


def is_distribution(labels, logits):
    """Whether ``labels`` are per-class targets (one-hot or label-smoothed,
    Keras' ``categorical_crossentropy`` data) rather than class ids: shaped
    like the logits, with more than one class. Decided on static shapes."""
    shape, out = tf.TensorShape(labels.shape), tf.TensorShape(logits.shape)
    return (shape.rank is not None and shape.rank >= 2
            and shape.rank == out.rank and shape[-1] is not None
            and shape[-1] > 1 and shape[-1] == out[-1])


def class_ids(labels, logits):
    """Integer class ids (a vector) from ids of any shape or from targets
    shaped like ``logits`` (their arg-max)."""
    labels = tf.convert_to_tensor(labels)
    if is_distribution(labels, logits):
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    return tf.cast(tf.reshape(labels, [-1]), tf.int32)


def cross_entropy(labels, logits):
    """Per-example softmax cross-entropy against integer class ids, or
    against a target distribution shaped like ``logits`` (one-hot or
    label-smoothed): ``-sum(p * log_softmax(logits))``."""
    logits = _float32(logits)
    labels = tf.convert_to_tensor(labels)
    if is_distribution(labels, logits):
        return -tf.reduce_sum(_float32(labels) * tf.nn.log_softmax(logits),
                              axis=-1)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=class_ids(labels, logits), logits=logits)


def kl_divergence(p_logits, q_logits):
    """Per-example ``KL(softmax(p_logits) || softmax(q_logits))``.

    Gradients flow into both arguments; stop them at the call site where a
    target is meant to be fixed.
    """
    log_p = tf.nn.log_softmax(_float32(p_logits), axis=-1)
    log_q = tf.nn.log_softmax(_float32(q_logits), axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def margin_loss(labels, logits):
    """Per-example Carlini-Wagner margin ``max_{j != y} z_j - z_y``.

    Positive exactly when the example is misclassified; maximising it is the
    untargeted CW attack objective.
    """
    logits = _float32(logits)
    labels = class_ids(labels, logits)
    num_classes = tf.shape(logits)[-1]
    onehot = tf.one_hot(labels, num_classes, dtype=logits.dtype)
    true_logit = tf.reduce_sum(onehot * logits, axis=-1)
    # Mask the true class with a large negative value (no boolean indexing:
    # shapes stay static for XLA).
    other = tf.reduce_max(logits - onehot * 1e9, axis=-1)
    return other - true_logit


def correct(labels, logits):
    """Per-example 1.0/0.0: is the arg-max of ``logits`` the label (the
    arg-max of the targets when they are a distribution)?"""
    labels = class_ids(labels, logits)
    return tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32),
                            labels), tf.float32)


def gradient_cosine(g1, g2):
    """Per-example cosine between two batches of input gradients.

    Returns ``(cos, nonzero)``: ``cos`` is 0 where either gradient is all
    zero, and ``nonzero`` (float32 0/1) marks the examples where both are
    not. Shared by GradAlign's regulariser and the CO guard's alignment
    measurement (Andriushchenko & Flammarion 2020).
    """
    n = tf.shape(g1)[0]
    flat1 = tf.reshape(g1, [n, -1])
    flat2 = tf.reshape(g2, [n, -1])
    n1 = tf.norm(flat1, axis=1)
    n2 = tf.norm(flat2, axis=1)
    nonzero = tf.cast((n1 > 0) & (n2 > 0), tf.float32)
    cos = tf.reduce_sum(flat1 * flat2, axis=1) / tf.maximum(n1 * n2, 1e-20)
    return cos, nonzero


def replica_mean(per_example, sample_weight=None, num_replicas=None):
    """Replica-correct mean of a per-example vector: the one reduction helper.

    Returns ``sum(w * v) / (local_batch * num_replicas)``. Summing this value's
    gradients over replicas (what the optimizer's all-reduce does) gives the
    gradient of the mean over the global batch, so N replicas with global batch
    B take the same step as one device with batch B. ``num_replicas`` defaults
    to the current strategy's ``num_replicas_in_sync`` (1 without a strategy).

    ``sample_weight`` multiplies each example; the denominator stays the
    example count (the Keras ``sum_over_batch_size`` convention).
    """
    per_example = _float32(per_example)
    if num_replicas is None:
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if sample_weight is not None:
        per_example = per_example * tf.reshape(_float32(sample_weight), [-1])
    local = tf.cast(tf.shape(per_example)[0], tf.float32)
    return tf.reduce_sum(per_example) / (local * float(num_replicas))
