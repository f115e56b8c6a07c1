"""The model registry and the normalisation layer every model starts with.

A model is registered as a *body*: a function ``body(x, num_classes,
**kwargs) -> logits`` that takes the already-normalised image tensor and
returns the logits tensor, built with the Keras functional API from built-in
layers only. :func:`get` adds the input and the normalisation layer, so every
model has the same head and a saved ``model.keras`` loads with plain Keras.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np

#: name -> body function (see the module docstring).
MODELS: dict = {}


def register(name: str, body: Callable = None):
    """Registers ``body`` under ``name``; usable as a decorator ``@register(name)``."""

    def add(fn):
        if name in MODELS and MODELS[name] is not fn:
            raise ValueError(f"A model named {name!r} is already registered.")
        MODELS[name] = fn
        return fn

    return add if body is None else add(body)


def _per_channel(value, default, channels, what):
    array = np.asarray(default if value is None else value, np.float64).reshape(-1)
    if array.size not in (1, channels):
        raise ValueError(f"{what} must be a scalar or have {channels} values (one per channel).")
    return np.broadcast_to(array, (channels,)).tolist()


def normalization(channels: int, mean=None, std=None, name: str = "normalize"):
    """A ``keras.layers.Normalization`` computing ``(x - mean) / std`` per channel.

    ``mean``/``std`` are scalars or per-channel sequences in the units of the
    input (pixels in [0, 1]); None means 0 and 1 (identity), so the layer is
    always present and always first. Putting it inside the model keeps attack
    budgets (epsilon) in pixel units.
    """
    mean = _per_channel(mean, 0.0, channels, "mean")
    std = _per_channel(std, 1.0, channels, "std")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}.")
    return keras.layers.Normalization(
        axis=-1, mean=mean, variance=[s * s for s in std], name=name
    )


INITS = ("keras", "torch")


def get(name, num_classes, input_shape, mean=None, std=None, init="keras",
        **kwargs) -> keras.Model:
    """Builds model ``name`` for images in [0, 1] of ``input_shape`` (H, W, C).

    The model's first layer normalises with ``mean``/``std``; its output is
    logits (no softmax) of ``num_classes`` classes. ``kwargs`` go to the
    model's body (e.g. ``depth``/``width`` of ``wide_resnet``). ``init``:
    ``"keras"`` keeps Keras' defaults (Glorot-uniform kernels, zero biases);
    ``"torch"`` re-draws every convolution and dense layer as PyTorch's
    default ``reset_parameters`` does (see :func:`torch_init`).
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}.")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}.")
    inputs = keras.Input(shape=input_shape, name="image")
    x = normalization(input_shape[-1], mean, std)(inputs)
    logits = MODELS[name](x, int(num_classes), **kwargs)
    model = keras.Model(inputs, logits, name=name)
    if init == "torch":
        torch_init(model)
    return model


def torch_init(model) -> None:
    """Re-draws conv and dense weights as PyTorch's default initialisation.

    PyTorch's ``nn.Conv2d``/``nn.Linear`` draw the kernel from
    ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-b, b)`` with
    ``b = 1 / sqrt(fan_in)``, and the bias from the same ``U(-b, b)``
    (Keras: Glorot-uniform kernels, zero biases). Every tensor gets its own
    draw from one generator seeded from Keras' global seed
    (``keras.utils.set_random_seed``): an unseeded Keras initializer reuses
    its seed on every call, which would make each bias a copy of the first
    entries of its kernel. BatchNorm is unchanged (both frameworks start at
    scale 1, offset 0).
    """
    seeds = keras.random.SeedGenerator(int(np.random.randint(0, 2**31 - 1)))
    for layer in model._flatten_layers():
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        kernel = layer.kernel
        fan_in = int(np.prod(kernel.shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        for var in (kernel, layer.bias):
            if var is not None:
                var.assign(keras.random.uniform(var.shape, -bound, bound, seed=seeds))


def has_batchnorm(model) -> bool:
    """Whether ``model`` (or any nested model) contains a BatchNormalization layer."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            return True
        if hasattr(layer, "layers") and has_batchnorm(layer):
            return True
    return False
