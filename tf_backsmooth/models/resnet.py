"""CIFAR-style ResNet-18 and PreAct ResNet-18.

Both follow the PyTorch models used by the adversarial-training literature
(TRADES, Rice et al. 2020, Wong et al. 2020): a 3x3 stride-1 stem with 64
filters (no max-pool), four stages of two 3x3 basic blocks with 64, 128, 256
and 512 filters (stride 2 from the second stage), global average pooling and
a dense layer. Convolutions have no bias (BatchNorm follows).

* ``resnet18`` (He et al. 2016a): conv-BN-ReLU-conv-BN, shortcut conv1x1+BN
  when the shape changes, ReLU after the addition; the stem is conv-BN-ReLU.
* ``preact_resnet18`` (He et al. 2016b): BN-ReLU-conv-BN-ReLU-conv; the
  projection shortcut (a bare 1x1 conv) takes the pre-activated input; a final
  BN-ReLU precedes pooling.
"""

from __future__ import annotations

import keras

from tf_backsmooth.models.layers import batch_norm, bn_relu, classifier, conv2d, relu
from tf_backsmooth.models.registry import register

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def _conv3x3(x, filters, stride, name):
    return conv2d(x, filters, 3, stride=stride, padding=1, use_bias=False, name=name)


def _basic_block(x, filters, stride, name):
    out = bn_relu(_conv3x3(x, filters, stride, f"{name}_conv1"), f"{name}_1")
    out = batch_norm(_conv3x3(out, filters, 1, f"{name}_conv2"), f"{name}_2_bn")
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv2d(x, filters, 1, stride=stride, use_bias=False, name=f"{name}_shortcut")
        shortcut = batch_norm(shortcut, f"{name}_shortcut_bn")
    return relu(keras.layers.Add(name=f"{name}_add")([out, shortcut]), f"{name}_out_relu")


def _preact_block(x, filters, stride, name):
    out = bn_relu(x, f"{name}_1")
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv2d(out, filters, 1, stride=stride, use_bias=False, name=f"{name}_shortcut")
    out = _conv3x3(out, filters, stride, f"{name}_conv1")
    out = _conv3x3(bn_relu(out, f"{name}_2"), filters, 1, f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def _stages(x, block, blocks_per_stage):
    for stage, (filters, stride) in enumerate(STAGES, start=1):
        for i in range(blocks_per_stage):
            x = block(x, filters, stride if i == 0 else 1, f"stage{stage}_block{i + 1}")
    return x


@register("resnet18")
def resnet18(x, num_classes):
    x = bn_relu(_conv3x3(x, 64, 1, "stem_conv"), "stem")
    x = _stages(x, _basic_block, 2)
    return classifier(x, num_classes)


@register("preact_resnet18")
def preact_resnet18(x, num_classes):
    x = _conv3x3(x, 64, 1, "stem_conv")
    x = bn_relu(_stages(x, _preact_block, 2), "final")
    return classifier(x, num_classes)
