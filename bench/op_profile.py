#!/usr/bin/env python3
"""Op-type breakdown of a TensorFlow profile (no TensorBoard plugin needed).

    python bench/bs_profile.py --model=resnet18 --batch_size=32 --modes=graph --trace=DIR
    python bench/op_profile.py DIR/graph [--top=25] [--steps=2]

Reads the ``*.xplane.pb`` files that ``tf.profiler.experimental`` wrote under
the given folder (the newest run) and sums, per op type, the wall time of the
op events the executor recorded on the host's compute threads (events named
``op_name:OpType``). An XLA cluster counts as one event of its launching op.
Ops that ran at the same time on different threads are each counted in full,
so the column adds up to more than the wall time when the inter-op pool ran
ops in parallel; the ``% of op time`` column is therefore a share of op time,
not of the step. ``--steps`` divides the sums by the number of traced steps
(``bs_profile.py --trace`` traces 2 ``fit`` steps).

The ``group`` column folds op types into convolutions (forward and both
gradients), BatchNorm, elementwise and the rest, which is the question issue
13 asks (BUILD_NOTES.md, "Backward Smoothing step: profile and speed").
"""

import argparse
import collections
import pathlib
import sys

GROUPS = (
    ("convolution", ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter",
                     "_MklNativeConv2D", "_MklNativeConv2DBackpropInput",
                     "_MklNativeConv2DBackpropFilter", "_MklNativeFusedConv2D",
                     "_FusedConv2D", "_MklNativeConv2DWithBias",
                     "_MklNativeConv2DBackpropFilterWithBias", "DepthwiseConv2dNative")),
    ("matmul", ("MatMul", "_MklMatMul", "_MklNativeMatMul", "_MklFusedMatMul",
                "_MklNativeFusedMatMul", "BatchMatMulV2", "_MklBatchMatMulV2")),
    ("batchnorm", ("FusedBatchNormV3", "FusedBatchNormGradV3", "_MklNativeFusedBatchNormV3",
                   "_MklNativeFusedBatchNormGradV3", "_MklFusedBatchNormV3",
                   "_MklFusedBatchNormGradV3", "_MklNativeFusedBatchNormEx")),
    ("xla cluster", ("_XlaRun", "_XlaCompile", "XlaLaunch", "_XlaMerge")),
    ("relu", ("Relu", "ReluGrad", "_MklRelu", "_MklReluGrad")),
    ("pad / slice / concat", ("Pad", "PadV2", "Slice", "StridedSlice", "StridedSliceGrad",
                              "ConcatV2", "Split", "SplitV", "Transpose", "Reshape")),
)
SKIP = ("ThreadpoolListener", "ExecutorState", "Executor", "Rendezvous")


def group_of(op_type):
    for name, types in GROUPS:
        if op_type in types:
            return name
    return "other"


def load_space(folder):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(pathlib.Path(folder).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"{folder}: no *.xplane.pb profile below it "
                         "(write one with bench/bs_profile.py --trace=DIR)")
    space = xplane_pb2.XSpace()
    space.ParseFromString(files[-1].read_bytes())
    return files[-1], space


def op_times(space):
    """``{op_type: (total_ps, count)}`` over the host plane's compute threads."""
    totals = collections.defaultdict(lambda: [0, 0])
    for plane in space.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.startswith(SKIP):
                    continue
                op_type = name.rsplit(":", 1)[1]
                totals[op_type][0] += event.duration_ps
                totals[op_type][1] += 1
    return totals


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    path, space = load_space(args.folder)
    totals = op_times(space)
    if not totals:
        raise SystemExit(f"{path}: no op events on the host's compute threads")
    all_ps = sum(t for t, _ in totals.values())
    print(f"profile: {path}")
    print(f"op time per step (all threads): {all_ps / 1e9 / args.steps:.1f} ms")
    print(f"\n{'op type':<42}{'group':<22}{'ms/step':>10}{'calls/step':>12}{'% of op time':>14}")
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    for op_type, (ps, n) in rows[:args.top]:
        print(f"{op_type:<42}{group_of(op_type):<22}{ps / 1e9 / args.steps:>10.1f}"
              f"{n / args.steps:>12.0f}{100 * ps / all_ps:>14.1f}")
    groups = collections.defaultdict(int)
    for op_type, (ps, _) in totals.items():
        groups[group_of(op_type)] += ps
    print(f"\n{'group':<42}{'ms/step':>10}{'% of op time':>14}")
    for name, ps in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{name:<42}{ps / 1e9 / args.steps:>10.1f}{100 * ps / all_ps:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
