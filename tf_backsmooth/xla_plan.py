"""How the per-replica training step runs: XLA or graph mode, by a rule, then a measurement.

:func:`resolve_xla` turns a ``jit_compile`` request into ``(used, why)``;
where the rule leaves the choice open (a CPU, BatchNorm, an unrolled attack:
:func:`xla_needs_measurement`), :func:`time_modes` times both modes on one
batch and keeps XLA only if it wins by :data:`XLA_MARGIN`.
``RobustModel.compile`` and ``RobustModel.measure_xla`` hold the resulting
:class:`StepPlan`.
"""

from __future__ import annotations

import time
import typing

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import attacks


def resolve_xla(request, batch_norm=False, attack_steps=0):
    """Turns a ``jit_compile`` request (True/False/"auto") into ``(used, why)``.

    ``"auto"`` never enables XLA with op determinism on (XLA has no
    deterministic kernels for every op); otherwise it enables it where a GPU
    is visible. On a CPU it keeps graph mode, except that for a model with
    BatchNorm (``batch_norm``) trained with an attack whose loop is unrolled
    (``1 <= attack_steps <= attacks.UNROLL_MAX_STEPS``) the choice is left to
    a measurement (:func:`xla_needs_measurement`,
    :meth:`RobustModel.measure_xla`): there XLA fuses Keras' unfused
    BatchNorm arithmetic and the short attack, and the BS step of ResNet-18
    ran 1.65x faster under XLA on one of our CPUs and 1.22x slower on
    another (BUILD_NOTES.md, "CPU kernels").
    Graph mode stayed faster on every CPU without BatchNorm (SmallCNN),
    without an attack, and around ``tf.while_loop`` attack loops (TRADES-10,
    PGD-10: 4x slower under XLA). Until measured, such a model runs in graph
    mode. Unlike Keras' own ``"auto"``, XLA stays available under a
    distribution strategy, because only the per-replica function is
    compiled.
    """
    if request is True:
        return True, "requested"
    if request is False or request is None:
        return False, "requested off"
    if request != "auto":
        raise ValueError(f"jit_compile must be True, False or 'auto', got {request!r}")
    # Not exported under tf.config; Keras' own "auto" reads the same function.
    from tensorflow.python.framework.config import is_op_determinism_enabled
    if is_op_determinism_enabled():
        return False, "auto: op determinism is enabled"
    if tf.config.list_physical_devices("GPU"):
        return True, "auto: GPU present"
    if not batch_norm:
        return False, "auto: CPU, no BatchNorm (graph mode measured faster)"
    if attack_steps < 1:
        return False, "auto: CPU, no attack (graph mode measured faster)"
    if attack_steps > attacks.UNROLL_MAX_STEPS:
        return False, (f"auto: CPU, {attack_steps}-step attack loop "
                       "(tf.while_loop; graph mode measured faster)")
    return False, (f"auto: CPU, BatchNorm and a {attack_steps}-step unrolled "
                   f"attack{UNMEASURED}")


# The end of resolve_xla's reason when the choice is left to a measurement.
UNMEASURED = ": graph mode until XLA and graph mode are timed on a batch"


def xla_needs_measurement(request, batch_norm=False, attack_steps=0):
    """Whether ``resolve_xla(request, ...)`` leaves the choice between XLA
    and graph mode to a measurement (``"auto"`` on a CPU, BatchNorm, an
    unrolled attack loop; see :func:`resolve_xla`)."""
    return (request == "auto"
            and resolve_xla(request, batch_norm, attack_steps)[1].endswith(
                UNMEASURED))


# measure_xla picks XLA only when it is at least this much faster (ties go to
# graph mode: no compile time, and the same kernels as the other steps).
XLA_MARGIN = 0.05


def timed(fn, args, xla):
    """Seconds one call of the per-replica step ``fn`` takes (its results
    fetched to the host, so the work is done). ``xla`` says which mode ``fn``
    is; a hook for tests."""
    del xla
    start = time.perf_counter()
    _, stats = fn(*args)
    np.asarray(stats["loss"])
    return time.perf_counter() - start


def first_batch(x, y=None, batch_size=None):
    """``(x, y, sample_weight)`` of the first batch ``fit`` will see, read
    without consuming it, or None (no labels, a generator, dict inputs)."""
    if isinstance(x, tf.data.Dataset):
        batch = next(iter(x.take(1)), None)
    elif isinstance(x, keras.utils.PyDataset):
        batch = x[0]
    elif y is not None and (isinstance(x, (np.ndarray, tf.Tensor))
                            or hasattr(x, "__array__")):
        n = batch_size or 32
        batch = (x[:n], y[:n])
    else:
        return None
    if not isinstance(batch, tuple):
        return None
    bx, by, bw = keras.utils.unpack_x_y_sample_weight(batch)
    if by is None or isinstance(bx, (dict, list, tuple)):
        return None
    return bx, by, bw


class StepPlan(typing.NamedTuple):
    """How ``compile`` runs the per-replica step: ``xla`` and its ``reason``
    (see :func:`resolve_xla`), and ``inline``: the step runs inside Keras'
    train function, without a nested ``tf.function`` (``run_eagerly``, and
    synchronised BatchNorm, whose cross-replica ``merge_call`` neither XLA
    nor a nested ``tf.function`` supports)."""

    xla: bool
    reason: str
    inline: bool


def time_modes(step_fn, args, variables, rule, repeats=3):
    """Times ``step_fn(*args)`` (the per-replica attack + loss + gradient
    function) as a ``tf.function`` in graph mode and under XLA: one call each
    to trace and compile, then ``repeats`` alternated calls each; every one of
    ``variables`` is restored afterwards (BatchNorm statistics and dropout
    seeds move during the calls). Returns ``(StepPlan, the faster
    tf.function)``; XLA only if its fastest call beats graph mode's by
    :data:`XLA_MARGIN`."""
    fns = {xla: tf.function(step_fn, jit_compile=xla, reduce_retracing=True)
           for xla in (False, True)}
    saved = [np.array(v.numpy()) for v in variables]
    try:
        first = {xla: timed(fns[xla], args, xla) for xla in (False, True)}
        best = {False: float("inf"), True: float("inf")}
        for _ in range(max(1, repeats)):
            for xla in (False, True):
                best[xla] = min(best[xla], timed(fns[xla], args, xla))
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)
    use = best[True] < best[False] * (1 - XLA_MARGIN)
    reason = (f"{rule}: measured on a batch of {int(args[0].shape[0])}: XLA "
              f"{best[True] * 1e3:.0f} ms, graph {best[False] * 1e3:.0f} ms "
              f"per step (first calls {first[True]:.1f} s / "
              f"{first[False]:.1f} s)")
    return StepPlan(use, reason, False), fns[use]
