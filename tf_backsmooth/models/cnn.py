"""Small CNNs and an MLP for MNIST-like data and fast tests.

* ``small_cnn``: the SmallCNN of the TRADES MNIST experiments (Zhang et al.
  2019): four 3x3 "valid" convolutions (32, 32, 64, 64) with ReLU and two 2x2
  max-pools, then dense 200 - dropout 0.5 - dense 200 - dense classes.
* ``mnist_cnn``: the MNIST CNN of Wong et al. 2020 ("Fast is better than
  free"): conv 16 4x4 stride 2 pad 1, conv 32 4x4 stride 2 pad 1, dense 100,
  dense classes. Cheap enough for CPU grids.
* ``madry_cnn``: the MNIST network of Madry et al. 2018 (MadryLab/mnist_challenge
  ``model.py``): conv 32 5x5 "same", 2x2 max-pool, conv 64 5x5 "same", 2x2
  max-pool, dense 1024, dense classes (3,274,634 parameters for 10 classes).
* ``mlp``: flatten, one ReLU hidden layer (``hidden`` units), dense classes.
"""

from __future__ import annotations

import keras

from tf_backsmooth.models.layers import conv2d, relu
from tf_backsmooth.models.registry import register


def _dense(x, units, name, activation=None):
    return keras.layers.Dense(units, activation=activation, name=name)(x)


@register("small_cnn")
def small_cnn(x, num_classes, dropout=0.5):
    for name, filters in (("conv1", 32), ("conv2", 32), ("pool1", None),
                          ("conv3", 64), ("conv4", 64), ("pool2", None)):
        if filters is None:
            x = keras.layers.MaxPooling2D(2, name=name)(x)
        else:
            x = relu(conv2d(x, filters, 3, name=name), f"{name}_relu")
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense(x, 200, "fc1", "relu")
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = _dense(x, 200, "fc2", "relu")
    return _dense(x, num_classes, "logits")


@register("mnist_cnn")
def mnist_cnn(x, num_classes):
    x = relu(conv2d(x, 16, 4, stride=2, padding=1, name="conv1"), "conv1_relu")
    x = relu(conv2d(x, 32, 4, stride=2, padding=1, name="conv2"), "conv2_relu")
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense(x, 100, "fc1", "relu")
    return _dense(x, num_classes, "logits")


@register("madry_cnn")
def madry_cnn(x, num_classes):
    for i, filters in ((1, 32), (2, 64)):
        x = relu(conv2d(x, filters, 5, padding=2, name=f"conv{i}"), f"conv{i}_relu")
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense(x, 1024, "fc1", "relu")
    return _dense(x, num_classes, "logits")


@register("mlp")
def mlp(x, num_classes, hidden=64):
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense(x, hidden, "fc1", "relu")
    return _dense(x, num_classes, "logits")
