#!/usr/bin/env python3
"""Convolution by convolution: TensorFlow against PyTorch on one network's shapes.

    pip install torch                     # benchmark only; not a package dependency
    python bench/conv_parity.py [--model=resnet18] [--batch_size=32] [--rounds=5]

For every ``Conv2D`` layer of the network (``models.get``, built for its
input shape) this times, on random data and in one process, the two
frameworks' work for that layer in a training step (forward, input gradient
and filter gradient) and in an attack step (forward and input gradient
only):

* ``tf model``: what our models run (``models.layers.conv2d``), in a
  ``tf.function``: a ``SAME`` convolution where that equals PyTorch's
  padding (stride 1), else Keras' ``ZeroPadding2D`` then a ``VALID`` one;
  TensorFlow's own gradients (our attacks take the input gradient of a
  convolution with at most 4 input channels, e.g. the stem, with
  ``tf_backsmooth.fastgrad``, faster than shown here);
* ``tf explicit``: one ``Conv2D`` with the same padding given as
  ``EXPLICIT`` (no separate pad op; the same op as ``tf model`` for SAME layers);
* ``torch``: ``torch.nn.functional.conv2d`` with the same padding, NCHW,
  ``torch.autograd.grad`` (eager: what the official scripts run).

Rounds alternate the frameworks and the minimum over rounds is kept; the
per-layer times are summed over the network (each layer once, as it runs)
and the ratio torch / tf is printed (> 1: TensorFlow's convolutions are
faster). That ratio bounds what a convolution-bound network can reach
against PyTorch in ``bench/vs_pytorch.py``: if both frameworks' other ops
cost nothing, the step-time ratio is this one.
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    raise SystemExit("bench/conv_parity.py needs torch: pip install torch") from None

import keras  # noqa: E402
import numpy as np  # noqa: E402
import step_cost  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_backsmooth import models  # noqa: E402


def conv_layers(name, batch):
    """(label, input NHWC shape before padding, pad, kernel, stride) per Conv2D.

    ``pad`` > 0: a ``ZeroPadding2D`` of ``pad`` pixels per side precedes the
    convolution in the model; < 0: the model's convolution is ``SAME``
    (``-pad`` pixels per side); 0: no padding.
    """
    shape = step_cost.SHAPES[name]
    model = models.get(name, input_shape=shape, num_classes=10)
    out = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        node = layer._inbound_nodes[0]
        src = node.input_tensors[0]
        pad = 0
        hist = src._keras_history
        if isinstance(hist.operation, keras.layers.ZeroPadding2D):
            (pad, _), _ = hist.operation.padding
            src = hist.operation._inbound_nodes[0].input_tensors[0]
        h, w, c = src.shape[1:]
        kshape = tuple(layer.kernel.shape)
        if layer.padding == "same":  # models.layers.conv2d: stride 1, odd kernel
            if layer.strides != (1, 1) or kshape[0] % 2 == 0:
                raise SystemExit(f"{layer.name}: SAME padding only with stride 1, odd kernel")
            pad = -((kshape[0] - 1) // 2)  # negative: SAME in the model
        if layer.dilation_rate != (1, 1):
            raise SystemExit(f"{layer.name}: dilated convolutions are not handled")
        out.append((layer.name, (batch, h, w, c), pad, kshape, layer.strides[0]))
    return out


def mean_ms(fn, rounds_inner):
    """Mean milliseconds per call over ``rounds_inner`` calls, after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(rounds_inner):
        fn()
    return (time.perf_counter() - t) / rounds_inner * 1e3


def make(shape, pad, kshape, stride, train):
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    k = (rng.standard_normal(kshape, dtype=np.float32) * 0.05)
    xt, kt = tf.constant(x), tf.Variable(k)
    same, pad = pad < 0, abs(pad)
    pads = [[0, 0], [pad, pad], [pad, pad], [0, 0]]

    def tf_fn(explicit):
        @tf.function
        def f():
            with tf.GradientTape() as tape:
                tape.watch(xt)
                if explicit:
                    y = tf.nn.conv2d(xt, kt, stride, pads)
                elif same:
                    y = tf.nn.conv2d(xt, kt, stride, "SAME")
                else:
                    y = tf.nn.conv2d(tf.pad(xt, pads), kt, stride, "VALID")
                loss = tf.reduce_sum(y * y)
            grads = tape.gradient(loss, [xt, kt] if train else [xt])
            return tf.add_n([tf.reduce_sum(g) for g in grads])
        return lambda: f().numpy()

    xp = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    wp = torch.from_numpy(k.transpose(3, 2, 0, 1).copy()).requires_grad_(train)

    def torch_fn():
        y = torch.nn.functional.conv2d(xp, wp, stride=stride, padding=pad)
        grads = torch.autograd.grad((y * y).sum(), [xp, wp] if train else [xp])
        return float(sum(g.sum() for g in grads))

    return {"tf model": tf_fn(False), "tf explicit": tf_fn(True), "torch": torch_fn}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", choices=sorted(step_cost.SHAPES))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inner", type=int, default=5, help="calls per timed round")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    layers = conv_layers(args.model, args.batch_size)
    print(f"{args.model}, batch {args.batch_size}, {len(layers)} Conv2D layers; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), tensorflow {tf.__version__}; "
          f"min over {args.rounds} alternated rounds of {args.inner} calls, ms")
    for train in (True, False):
        what = "training (forward + input and filter gradients)" if train else \
            "attack (forward + input gradient)"
        print(f"\n{what}")
        print(f"{'layer':28s} {'input':>16s} {'k':>3s} {'s':>2s} {'tf model':>13s} "
              f"{'tf explicit':>12s} {'torch':>8s} {'torch/tf':>9s}")
        totals = {}
        for label, shape, pad, kshape, stride in layers:
            fns = make(shape, pad, kshape, stride, train)
            times = {k: float("inf") for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k] = min(times[k], mean_ms(fn, args.inner))
            for k, v in times.items():
                totals[k] = totals.get(k, 0.0) + v
            print(f"{label:28s} {'x'.join(map(str, shape[1:])):>16s} {kshape[0]:>3d} {stride:>2d} "
                  f"{times['tf model']:13.2f} {times['tf explicit']:12.2f} "
                  f"{times['torch']:8.2f} {times['torch'] / times['tf model']:9.2f}")
        print(f"{'sum':28s} {'':>16s} {'':>3s} {'':>2s} {totals['tf model']:13.1f} "
              f"{totals['tf explicit']:12.1f} {totals['torch']:8.1f} "
              f"{totals['torch'] / totals['tf model']:9.2f}")
        print(f"torch / tf explicit: {totals['torch'] / totals['tf explicit']:.2f}")


if __name__ == "__main__":
    main()
