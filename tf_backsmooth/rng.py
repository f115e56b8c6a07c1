"""Counter-based stateless random numbers that are identical in every mode.

Why not ``tf.random.stateless_*``: for the same seed they draw *different*
numbers under XLA than in eager/graph mode (measured here on TF 2.21, also with
``alg="philox"``), so a run's noise would depend on ``jit_compile`` and tests
could not compare modes. These functions hash ``(seed, element index)`` with
the MurmurHash3 32-bit finaliser using only ``uint32`` multiply, xor and shift,
which every backend computes bit-identically; a NumPy mirror of the same hash
lives in the tests.

A seed is an int32 tensor of shape ``[2]`` (an int is taken as ``[seed, 0]``).
Noise for a training step is derived with :func:`fold_in` from
``(run seed, step, replica id)``, so replicas and steps draw independent noise
and a run repeats exactly.
"""

from __future__ import annotations

import math

import tensorflow as tf

# ----------------------------------------------------------------------------
# Named seed streams
# ----------------------------------------------------------------------------
# Every consumer of random numbers folds its own constant into its parent seed
# (``fold_in(parent, STREAM)``), so no two consumers draw from the same stream.
# The values are part of every result: changing one changes the numbers drawn
# (and breaks bit-identical reruns and resumes of earlier runs). Add new
# streams with new values; never renumber.

#: RobustModel: the training attack's noise, ``fold_in(step seed, .)``; the step
#: seed is ``fold_in(fold_in([seed, 0], optimizer step), replica id)``.
TRAIN_ATTACK = 1
#: RobustModel: the objective's noise (GradAlign's eta), ``fold_in(step seed, .)``.
TRAIN_OBJECTIVE = 2
#: data (the training pipeline): augmentation of global step ``t`` from
#: ``fold_in(fold_in(run seed, .), t)``.
AUGMENT = 7
#: The CO guard's measurement seed is ``[guard seed, CO_GUARD]``; its PGD start
#: and its alignment noise fold in ``CO_GUARD_PGD`` and ``CO_GUARD_ALIGNMENT``.
CO_GUARD = 0x5EED
CO_GUARD_PGD = 1
CO_GUARD_ALIGNMENT = 2
#: evaluation: one stream per attack, ``fold_in([seed, 0], .)`` (then the target
#: and the restart), so an attack's random starts do not depend on which other
#: attacks run or in which order.
EVAL_ATTACKS = {"fgsm": 1, "pgd": 2, "pgd_margin": 3, "apgd_ce": 4, "apgd_t": 5,
                "square": 6, "fab_t": 7}

_U32 = tf.uint32
_GOLDEN = 0x9E3779B9
_SALT1 = 0x632BE5AB
_SALT2 = 0x85157AF5


def _c(value):
    return tf.constant(value, _U32)


def fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijective avalanche mix)."""
    xor, shift = tf.bitwise.bitwise_xor, tf.bitwise.right_shift
    h = xor(h, shift(h, _c(16))) * _c(0x85EBCA6B)
    h = xor(h, shift(h, _c(13))) * _c(0xC2B2AE35)
    return xor(h, shift(h, _c(16)))


def make_seed(seed):
    """Normalises ``seed`` (int, or int tensor of shape [] or [2]) to int32 [2].

    ``None`` draws a fresh seed from TensorFlow's global (stateful) RNG.
    """
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"seed must be an integer tensor, got {seed.dtype}")
    seed = tf.cast(seed, tf.int32)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.zeros_like(seed)])
    return seed


def _as_u32(seed):
    return tf.bitcast(make_seed(seed), _U32)


def fold_in(seed, data):
    """A new seed from ``seed`` and an integer ``data`` (e.g. a step number)."""
    s = _as_u32(seed)
    d = tf.bitcast(tf.cast(data, tf.int32), _U32)
    a = fmix32(tf.bitwise.bitwise_xor(s[0], fmix32(d * _c(_GOLDEN) + _c(_SALT1))))
    b = fmix32(s[1] + fmix32(d + _c(_SALT2)))
    return tf.bitcast(tf.stack([a, b]), tf.int32)


def _bits(shape, seed):
    """uint32 hash of every element index, as a tensor of ``shape``."""
    s = _as_u32(seed)
    n = tf.reduce_prod(tf.cast(shape, tf.int32))
    counter = tf.cast(tf.range(n), _U32)
    h = fmix32(counter * _c(_GOLDEN) + fmix32(s[0]))
    h = fmix32(tf.bitwise.bitwise_xor(h, fmix32(s[1] + _c(_SALT1))))
    return tf.reshape(h, shape)


def _unit(shape, seed, dtype):
    """``U[0, 1)`` on a 2^-24 grid; ``+0.5`` ulp keeps it inside ``(0, 1)``."""
    top = tf.bitwise.right_shift(_bits(shape, seed), _c(8))
    return (tf.cast(top, tf.float32) + 0.5) * (2.0**-24)


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype=tf.float32):
    """``U(minval, maxval)`` of ``shape``."""
    u = _unit(shape, seed, tf.float32)
    return tf.cast(minval + (maxval - minval) * u, dtype)


def normal(shape, seed, dtype=tf.float32):
    """``N(0, 1)`` of ``shape`` (Box-Muller on two independent streams)."""
    u1 = _unit(shape, fold_in(seed, 1), tf.float32)
    u2 = _unit(shape, fold_in(seed, 2), tf.float32)
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)
    return tf.cast(z, dtype)


def uniform_rows(seeds, n):
    """``U[0, 1)`` of shape ``[B, n]``, row ``i`` keyed on ``seeds[:, i]``.

    ``seeds`` is int32 ``[2, B]`` (e.g. ``fold_in(seed, index)`` of a vector of
    example indices). Row ``i`` equals ``uniform([n], seeds[:, i])``: the same
    hash, evaluated for every row at once (no ``map_fn``), so per-example draws
    inside a long ``tf.while_loop`` cost a few element-wise ops.
    """
    s = tf.bitcast(tf.cast(seeds, tf.int32), _U32)
    counter = tf.cast(tf.range(n), _U32)[tf.newaxis, :]
    h = fmix32(counter * _c(_GOLDEN) + fmix32(s[0])[:, tf.newaxis])
    h = fmix32(tf.bitwise.bitwise_xor(h, fmix32(s[1] + _c(_SALT1))[:, tf.newaxis]))
    top = tf.bitwise.right_shift(h, _c(8))
    return (tf.cast(top, tf.float32) + 0.5) * (2.0**-24)
