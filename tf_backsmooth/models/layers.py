"""Functional building blocks shared by the model zoo (built-in layers only).

``conv2d`` takes PyTorch-style symmetric ``padding``: Keras' ``"same"`` pads
asymmetrically (bottom/right only) for strided convolutions, which would shift
every feature map relative to the reference models, so strided convolutions
use an explicit ``ZeroPadding2D`` + ``"valid"`` convolution instead.
BatchNorm uses PyTorch's defaults: Keras ``momentum=0.9`` is PyTorch's
``momentum=0.1``, and ``epsilon=1e-5``. Kernels use Keras' default
initialisers (Glorot uniform, zero bias), not the references' Kaiming normal.
"""

from __future__ import annotations

import keras

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv2d(x, filters, kernel, stride=1, padding=0, use_bias=True, name=None):
    """A 2-D convolution with PyTorch's ``padding`` semantics (pixels per side)."""
    if padding and stride == 1 and 2 * padding == kernel - 1:
        mode = "same"  # symmetric in this case
    else:
        mode = "valid"
        if padding:
            x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters, kernel, strides=stride, padding=mode, use_bias=use_bias, name=name
    )(x)


def batch_norm(x, name):
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )(x)


def relu(x, name):
    return keras.layers.ReLU(name=name)(x)


def bn_relu(x, name):
    """BatchNorm then ReLU, named ``{name}_bn`` and ``{name}_relu``."""
    return relu(batch_norm(x, f"{name}_bn"), f"{name}_relu")


def classifier(x, num_classes, name="logits"):
    """Global average pooling and the final dense layer (logits, no softmax)."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.layers.Dense(num_classes, name=name)(x)
