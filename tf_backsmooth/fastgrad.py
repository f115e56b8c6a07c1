"""A faster input gradient for convolutions with few input channels (CPU).

The attacks differentiate the model with respect to its input. For the first
convolution of an MNIST or CIFAR network (1 or 3 input channels) TensorFlow's
CPU kernel for that gradient, oneDNN's ``Conv2DBackpropInput``, is 2.7-6x
slower than the same numbers computed as one matrix product and a col2im
(the sum of the kernel's shifted taps) compiled with XLA: on a 2-core AMD
EPYC, SmallCNN's first convolution (batch 128, 1 -> 32 channels, 3x3)
5.4 -> 1.8 ms, ``mnist_cnn``'s (batch 500, 1 -> 16, 4x4, stride 2)
7.7 -> 1.3 ms, ResNet-18's stem (batch 32, 3 -> 64, 3x3) 3.8 -> 1.4 ms; with
16 or more input channels oneDNN is faster (BUILD_NOTES.md, "Input
gradient of the first convolution").

:func:`input_gradient_override` is a context manager under which gradients of
``Conv2D`` ops with at most :data:`MAX_INPUT_CHANNELS` input channels (NHWC,
no dilation, ``SAME`` or ``VALID`` padding, static spatial shapes, float32 or
float64) compute the input gradient with :func:`conv2d_input_grad`; every
other gradient, and the filter gradient, is TensorFlow's own.
``attacks.input_gradient`` takes its gradients under it, so it applies to
every attack and to nothing else (the training step's weight gradients are
untouched). Results equal TensorFlow's up to float rounding (relative 1e-6).

How: ``tf.GradientTape`` looks a gradient function up by op type in
TensorFlow's gradient registry, and neither ``gradient_override_map`` nor a
public API reaches it, so the context swaps the registry's ``Conv2D`` entry
while it is open (reentrant and thread-safe: MirroredStrategy traces its
replicas in threads; the entry is restored when the last one leaves). The
registry is private to TensorFlow: if its layout is not the one expected,
the context does nothing and logs why once (``override_status()``).
:data:`ENABLED` is ``"auto"`` by default: on where it measured faster, a
CPU on which TensorFlow runs oneDNN's kernels (:func:`kernel_rule`: off with
a GPU or TPU, and off under TensorFlow's Eigen kernels, where it measured
slower); ``True`` or ``False`` forces it.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf
from absl import logging

from tf_backsmooth import cpu

#: Whether :func:`input_gradient_override` swaps the gradient in: True,
#: False, or ``"auto"`` (the default): :func:`kernel_rule`.
ENABLED = "auto"
#: Convolutions with at most this many input channels take the fast path
#: (measured faster at 1 and 3, slower at 16 and more).
MAX_INPUT_CHANNELS = 4
#: Whether the fast input gradient is compiled with XLA (about 1.5-3x faster
#: than the same ops in graph mode: the col2im's shifted adds fuse).
JIT = True

_DTYPES = (tf.float32, tf.float64)


def conv2d_input_grad(dy, kernel, input_hw, strides, padding):
    """``d loss / d x`` for ``y = conv2d(x, kernel)`` given ``dy = d loss / d y``.

    NHWC, no dilation; ``input_hw`` is ``x``'s static ``(H, W)``, ``strides``
    ``(sh, sw)``, ``padding`` ``"SAME"`` or ``"VALID"``. One matrix product
    gives every tap's contribution, ``cols[b, i, j, p, q, c] = sum_o dy[b, i,
    j, o] kernel[p, q, c, o]``, and the col2im adds them at input row ``sh*i +
    p - pad_top`` (columns alike): for each stride phase ``(p mod sh, q mod
    sw)`` the taps of that phase are shifted copies, summed with pads, and the
    phases are interleaved by a reshape.
    """
    kh, kw, ci, co = kernel.shape
    sh, sw = strides
    h, w = input_hw
    ho, wo = dy.shape[1], dy.shape[2]
    batch = tf.shape(dy)[0]
    cols = tf.matmul(tf.reshape(dy, [-1, co]),
                     tf.reshape(kernel, [kh * kw * ci, co]), transpose_b=True)
    cols = tf.reshape(cols, [batch, ho, wo, kh, kw, ci])
    if padding == "SAME":
        top = max((ho - 1) * sh + kh - h, 0) // 2
        left = max((wo - 1) * sw + kw - w, 0) // 2
    else:
        top = left = 0
    mh, mw = (kh - 1) // sh, (kw - 1) // sw  # largest shift within a phase
    hq, wq = ho + mh, wo + mw
    phase_rows = []
    for a in range(sh):
        row = []
        for b in range(sw):
            acc = None
            for p in range(a, kh, sh):
                for q in range(b, kw, sw):
                    dp, dq = p // sh, q // sw
                    tap = tf.pad(cols[:, :, :, p, q, :],
                                 [[0, 0], [dp, mh - dp], [dq, mw - dq], [0, 0]])
                    acc = tap if acc is None else acc + tap
            row.append(tf.zeros([batch, hq, wq, ci], dy.dtype) if acc is None else acc)
        phase_rows.append(tf.stack(row, 3))  # [B, hq, wq, sw, ci]
    full = tf.reshape(tf.stack(phase_rows, 2), [batch, hq * sh, wq * sw, ci])
    # Row r of ``full`` is row r of the padded input, i.e. input row r - top;
    # input rows past the last window (VALID) get no gradient.
    full = full[:, top:top + h, left:left + w, :]
    short_h = top + h - min(hq * sh, top + h)
    short_w = left + w - min(wq * sw, left + w)
    if short_h or short_w:
        full = tf.pad(full, [[0, 0], [0, short_h], [0, short_w], [0, 0]])
    return full


_COMPILED = {}


def _compiled(input_hw, strides, padding):
    key = (tuple(input_hw), tuple(strides), padding, JIT)
    if key not in _COMPILED:
        def fn(dy, kernel):
            return conv2d_input_grad(dy, kernel, input_hw, strides, padding)
        _COMPILED[key] = tf.function(fn, jit_compile=JIT, autograph=False)
    return _COMPILED[key]


def _fast_path_args(op):
    """``(input_hw, strides, padding)`` when ``op`` qualifies, else None."""
    try:
        if op.get_attr("data_format") not in (b"NHWC", "NHWC"):
            return None
        padding = op.get_attr("padding")
        padding = padding.decode() if isinstance(padding, bytes) else padding
        if padding not in ("SAME", "VALID"):
            return None
        if any(d != 1 for d in op.get_attr("dilations")):
            return None
        strides = op.get_attr("strides")
    except (ValueError, TypeError):
        return None
    x, kernel = op.inputs[0], op.inputs[1]
    if x.dtype not in _DTYPES or strides[0] != 1 or strides[3] != 1:
        return None
    shape = kernel.shape
    if not shape.is_fully_defined() or shape[2] > MAX_INPUT_CHANNELS:
        return None
    if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None:
        return None
    return (x.shape[1], x.shape[2]), (strides[1], strides[2]), padding


def _filter_gradient(op, grad):
    """TensorFlow's filter gradient of ``op`` alone (as in ``nn_grad._Conv2DGrad``)."""
    from tensorflow.python.ops import gen_nn_ops  # the op TF's own gradient calls

    return gen_nn_ops.conv2d_backprop_filter(
        op.inputs[0], tf.shape(op.inputs[1]), grad,
        dilations=op.get_attr("dilations"), strides=op.get_attr("strides"),
        padding=op.get_attr("padding"), explicit_paddings=op.get_attr("explicit_paddings"),
        use_cudnn_on_gpu=op.get_attr("use_cudnn_on_gpu"),
        data_format=op.get_attr("data_format"))


class _Override:
    """The swapped registry entry, shared by every thread that holds it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = None
        self.status = None  # None: not tried yet; else a sentence

    def registry(self):
        try:
            from tensorflow.python.framework import ops  # private: see module doc
            table = ops._gradient_registry._registry  # pylint: disable=protected-access
            entry = table["Conv2D"]
            if not (isinstance(entry, dict) and callable(entry.get("type"))):
                raise TypeError(f"unexpected entry {type(entry).__name__}")
            return table
        except Exception as e:  # noqa: BLE001 (any layout change disables it)
            if self.status is None:
                self.status = f"off: TensorFlow's gradient registry is not as expected ({e})"
                logging.warning("fastgrad: %s; attacks use TensorFlow's Conv2D gradient",
                                self.status)
            return None

    def enter(self):
        with self.lock:
            if self.depth == 0:
                table = self.registry()
                if table is None:
                    return False
                self.saved = table["Conv2D"]
                original = self.saved["type"]

                def gradient(op, grad):
                    args = _fast_path_args(op)
                    if args is None:
                        return original(op, grad)
                    skip = getattr(op, "skip_input_indices", None) or ()
                    dkernel = None if 1 in skip else _filter_gradient(op, grad)
                    return [_compiled(*args)(grad, op.inputs[1]), dkernel]

                table["Conv2D"] = dict(self.saved, type=gradient)
                self.status = "on"
            self.depth += 1
            return True

    def exit(self):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                from tensorflow.python.framework import ops
                ops._gradient_registry._registry["Conv2D"] = self.saved  # pylint: disable=protected-access
                self.saved = None


_OVERRIDE = _Override()


def accelerator():
    """The kind of accelerator visible to TensorFlow (``"GPU"``, ``"TPU"``), or None."""
    for kind in ("GPU", "TPU"):
        if tf.config.list_physical_devices(kind):
            return kind
    return None


def kernel_rule():
    """``(on, why)`` for the project's CPU kernels under ``"auto"`` (this
    module's input gradient and :mod:`tf_backsmooth.fused_bn`): on a CPU whose
    TensorFlow runs oneDNN's kernels, where both measured faster; off with a
    GPU or TPU (never measured there) and under TensorFlow's Eigen kernels
    (oneDNN off), where they measured slower (BUILD_NOTES.md, "CPU kernels")."""
    kind = accelerator()
    if kind is not None:
        return False, f"a {kind} is visible (measured on CPUs only)"
    if cpu.onednn_in_use() is False:
        return False, ("TensorFlow runs its Eigen kernels (oneDNN off), where this "
                       "measured slower")
    return True, "CPU with oneDNN kernels, where this measured faster"


def enabled():
    """Whether :func:`input_gradient_override` swaps the gradient in (reads
    :data:`ENABLED`)."""
    if ENABLED == "auto":
        return kernel_rule()[0]
    return bool(ENABLED)


@contextlib.contextmanager
def input_gradient_override():
    """Gradients taken inside use :func:`conv2d_input_grad` where it is faster."""
    if not enabled() or not _OVERRIDE.enter():
        yield
        return
    try:
        yield
    finally:
        _OVERRIDE.exit()


def describe():
    """One line for run manifests: which Conv2D input gradient attacks use."""
    if not enabled():
        return "tensorflow (" + _off_reason() + ")"
    status = _OVERRIDE.status
    if status is not None and status != "on":
        return f"tensorflow (fastgrad {status})"
    return (f"fastgrad: matmul + col2im{' under XLA' if JIT else ''} for Conv2D "
            f"with <= {MAX_INPUT_CHANNELS} input channels, TensorFlow's otherwise")


def override_status():
    """``"on"``, ``"off: <reason>"``, or ``"not used yet"``."""
    if not enabled():
        return "off: " + _off_reason()
    return _OVERRIDE.status or "not used yet"


def _off_reason():
    if ENABLED == "auto":
        return "auto: " + kernel_rule()[1]
    return "fastgrad.ENABLED is False"
