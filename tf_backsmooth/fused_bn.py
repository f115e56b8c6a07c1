"""Training-mode BatchNorm as one fused kernel inside the training step (CPU).

Keras 3 computes ``BatchNormalization`` on TensorFlow as separate ops:
``tf.nn.moments`` (a mean, a squared difference, another mean) and
``tf.nn.batch_normalization`` (an rsqrt, multiplies and adds), each with its
own backward ops. TensorFlow's ``FusedBatchNormV3`` kernel (oneDNN's on x86
CPUs) does the same in one forward and one backward op. On a 2-core AMD EPYC,
ResNet-18 at batch 32 (BUILD_NOTES.md, "Fused BatchNorm in the training
step"): a training-mode forward pass 220 -> 182 ms, a training backward pass
325 -> 198 ms, a whole Backward Smoothing step 2135 -> 1821 ms. Inference mode
gains nothing measurable (an input-gradient pass 358 vs 360 ms), and oneDNN's
fused *inference-mode* gradient differs from Keras' by up to 3 % inside a
ResNet where Keras and XLA agree to 1e-5, so only training mode is fused.

:func:`training_override` is a context manager under which every eligible
``keras.layers.BatchNormalization`` of a model computes its training-mode call
(``training=True`` on a trainable layer) with ``FusedBatchNormV3``; every
other call is Keras' own. ``RobustModel`` holds it while it builds its
per-replica step, so it changes what is traced there and nothing else: the
layers are Keras' own class before and after (a saved ``model.keras`` holds
only built-in objects), and a user's own calls of the model are untouched.

The results are Keras' up to float rounding: the same normalisation with the
batch's biased variance, the same moving-average update (the kernel returns
the unbiased variance ``n / (n - 1)`` times the biased one, which is converted
back before the update), the same gradients. Eligible layers: Keras' own
``call`` (not overridden by a subclass), 4-D float32 inputs normalised over
the last axis (or 4-D bfloat16 inputs of a ``mixed_bfloat16`` layer),
``center`` and ``scale`` on, no ``renorm``, not ``synchronized``, no mask, no
``call`` set on the instance by someone else; anything else falls back to
Keras' code at call time.

:data:`ENABLED` is ``"auto"`` by default: ``fastgrad.kernel_rule`` (on a CPU
whose TensorFlow runs oneDNN's kernels, where it measured faster);
``True`` or ``False`` forces it.
"""

from __future__ import annotations

import contextlib
import threading
import types

import keras
import tensorflow as tf

from tf_backsmooth import fastgrad

#: Whether :func:`training_override` fuses: True, False, or ``"auto"`` (the
#: default): ``fastgrad.kernel_rule``.
ENABLED = "auto"

_KERAS_CALL = keras.layers.BatchNormalization.call

# (input dtype, layer compute dtype) pairs that are fused: float32, and
# bfloat16 under the "mixed_bfloat16" policy (the kernel takes
# bfloat16 inputs with float32 statistics, scale and offset, as Keras
# computes them after its upcast). float16 was not measured: Keras' code.
_FUSED_DTYPES = {("float32", "float32"), ("bfloat16", "bfloat16")}


def enabled():
    """Whether :func:`training_override` fuses (reads :data:`ENABLED`)."""
    if ENABLED == "auto":
        return fastgrad.kernel_rule()[0]
    return bool(ENABLED)


def _ours(method):
    return getattr(method, "__func__", None) is _call


def eligible(layer):
    """Whether ``layer``'s training-mode call can be fused (its static part;
    the input's rank, dtype and mask are checked at call time). A layer whose
    ``call`` was replaced on the instance by anyone else is left alone."""
    own = layer.__dict__.get("call")
    return (isinstance(layer, keras.layers.BatchNormalization)
            and type(layer).call is _KERAS_CALL
            and (own is None or _ours(own))
            and not layer.synchronized and not getattr(layer, "renorm", False)
            and layer.center and layer.scale)


def fused_training_call(layer, inputs):
    """``layer(inputs, training=True)`` with one ``FusedBatchNormV3`` op.

    Normalises with the batch statistics and updates the moving statistics
    as Keras' ``BatchNormalization.call`` does (biased variance), up to float
    rounding.
    ``inputs``: a 4-D float32 or bfloat16 NHWC tensor, normalised over the
    channels (bfloat16: the statistics are accumulated in float32, as Keras'
    upcast does, and the output is bfloat16, as Keras casts it back).
    """
    empty = tf.constant([], tf.float32)
    outputs, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=layer.gamma, offset=layer.beta, mean=empty,
        variance=empty, epsilon=layer.epsilon, exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True)
    # The kernel returns n / (n - 1) times the biased variance (for n = 1
    # both are 0, and so is this).
    n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
    variance = unbiased * (n - 1.0) / n
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        layer.moving_variance * momentum + variance * (1.0 - momentum))
    return outputs


def _call(self, inputs, training=None, mask=None):
    """The ``call`` installed on an eligible layer inside the override."""
    axis = self.axis if isinstance(self.axis, int) else None
    if (training is True and self.trainable and mask is None
            and len(inputs.shape) == 4 and axis in (-1, 3)
            and (inputs.dtype.name, self.compute_dtype) in _FUSED_DTYPES):
        return fused_training_call(self, inputs)
    return _KERAS_CALL(self, inputs, training=training, mask=mask)


class _Patches:
    """Which layers carry the fused ``call``; reentrant and thread-safe
    (MirroredStrategy traces its replicas in threads over the same layers)."""

    def __init__(self):
        self.lock = threading.Lock()
        # id(layer) -> (layer, holders); the layer is kept so its id stays its own.
        self.depth = {}

    def enter(self, layers):
        """Patches ``layers``; returns those it holds (to pass to ``exit``)."""
        held_now = []
        with self.lock:
            for layer in layers:
                held, count = self.depth.get(id(layer), (layer, 0))
                if count == 0:
                    if "call" in layer.__dict__:  # someone else's: leave it
                        continue
                    layer.call = types.MethodType(_call, layer)
                self.depth[id(layer)] = (held, count + 1)
                held_now.append(layer)
        return held_now

    def exit(self, layers):
        with self.lock:
            for layer in layers:
                held, count = self.depth[id(layer)]
                if count == 1:
                    del self.depth[id(layer)]
                    del layer.call  # back to the class's method
                else:
                    self.depth[id(layer)] = (held, count - 1)


_PATCHES = _Patches()


def layers_of(model):
    """The eligible BatchNorm layers of ``model`` (nested models included)."""
    return [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if eligible(layer)]


@contextlib.contextmanager
def training_override(model):
    """Training-mode calls of ``model``'s eligible BatchNorm layers run fused.

    Does nothing when :func:`enabled` is false or the model has no eligible
    layer. Meant around tracing (a ``tf.function`` keeps the ops it traced)
    or around eager calls.
    """
    layers = layers_of(model) if enabled() else []
    if not layers:
        yield
        return
    held = _PATCHES.enter(layers)
    try:
        yield
    finally:
        _PATCHES.exit(held)


def describe():
    """One line for run manifests: how training-mode BatchNorm is computed."""
    if enabled():
        return "fused (FusedBatchNormV3) in the training step's training-mode calls"
    reason = ("auto: " + fastgrad.kernel_rule()[1] if ENABLED == "auto"
              else "fused_bn.ENABLED is False")
    return f"keras (unfused: {reason})"
