"""Wide ResNet (Zagoruyko & Komodakis 2016) as in the TRADES code.

WRN-``depth``-``width`` (default WRN-34-10): a 3x3 stem with 16 filters, three
groups of ``(depth - 4) / 6`` pre-activation basic blocks with 16*width,
32*width and 64*width filters (strides 1, 2, 2), a final BN-ReLU, global
average pooling and a dense layer. As in the TRADES ``BasicBlock``: when a
block changes the number of channels, its input is pre-activated (BN-ReLU)
once and that activation feeds both the 3x3 path and the 1x1 projection
shortcut; otherwise the shortcut is the identity on the raw input. Optional
dropout (``drop_rate``) between the two convolutions; TRADES uses 0.
The TRADES code also builds an unused ``sub_block1``, which is omitted here.
"""

from __future__ import annotations

import keras

from tf_backsmooth.models.layers import bn_relu, classifier, conv2d
from tf_backsmooth.models.registry import register


def _block(x, filters, stride, drop_rate, name):
    activated = bn_relu(x, f"{name}_1")
    if x.shape[-1] == filters:
        shortcut = x
    else:
        shortcut = conv2d(activated, filters, 1, stride=stride, use_bias=False,
                          name=f"{name}_shortcut")
    out = conv2d(activated, filters, 3, stride=stride, padding=1, use_bias=False,
                 name=f"{name}_conv1")
    out = bn_relu(out, f"{name}_2")
    if drop_rate > 0:
        out = keras.layers.Dropout(drop_rate, name=f"{name}_dropout")(out)
    out = conv2d(out, filters, 3, padding=1, use_bias=False, name=f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([out, shortcut])


@register("wide_resnet")
def wide_resnet(x, num_classes, depth=34, width=10, drop_rate=0.0):
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide_resnet depth must be 6n+4 with n >= 1, got {depth}.")
    blocks = (depth - 4) // 6
    x = conv2d(x, 16, 3, padding=1, use_bias=False, name="stem_conv")
    for group, (filters, stride) in enumerate(
        ((16 * width, 1), (32 * width, 2), (64 * width, 2)), start=1
    ):
        for i in range(blocks):
            x = _block(x, filters, stride if i == 0 else 1, drop_rate, f"group{group}_block{i + 1}")
    x = bn_relu(x, "final")
    return classifier(x, num_classes)
