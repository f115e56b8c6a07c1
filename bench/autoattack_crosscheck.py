#!/usr/bin/env python3
"""Our `autoattack` against torchattacks' AutoAttack, on the same model and images.

    pip install torch torchattacks       # benchmark only; not package dependencies
    python bench/autoattack_crosscheck.py --model_path=RUN_DIR --dataset=mnist \
        --epsilon=0.3 [--num_examples=1000] [--data_dir=...] [--output=report.json]
        [--torch_versions=paper,shipped] [--ours_only] [--jit_compile]

1. The saved Keras classifier (any linear stack of Normalization, ZeroPadding2D,
   Conv2D, ReLU, MaxPooling2D, Flatten, Dense, Dropout) is ported layer by layer
   to a PyTorch module; the logits on the evaluated images must agree to 1e-3
   (exit status 1 otherwise).
2. Our ``evaluation.evaluate(..., attacks="autoattack")`` (APGD-CE, APGD-T with
   9 targets, FAB-T with 9 targets, Square with 5000 queries; 100 iterations)
   and torchattacks on the same images, timed in the same process, one after
   the other. torchattacks runs in two configurations:

   * ``shipped``: ``torchattacks.AutoAttack(version="standard")`` as it is.
     Its APGD, APGD-T and FAB use torchattacks' default of **10** iterations,
     not the 100 of AutoAttack's standard version (Croce & Hein 2020; the
     reference ``autoattack`` package), so it is a weaker attack;
   * ``paper``: the same four torchattacks attacks in a ``MultiAttack`` with
     AutoAttack's standard settings (100 iterations, 9 targets, 5000 queries),
     the like-for-like comparison.

Printed: robust accuracy of each, the per-example disagreement (robust for
one, broken for the other), and images per second (evaluated images / wall
seconds) of each, with the ratio ours / torchattacks.
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import torch
    import torch.nn.functional as F
    import torchattacks
except ImportError:  # pragma: no cover - depends on the machine
    raise SystemExit("bench/autoattack_crosscheck.py needs torch and torchattacks: "
                     "pip install torch torchattacks") from None

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_backsmooth import data, evaluation  # noqa: E402


# ----------------------------------------------------------------------------
# Keras -> PyTorch, layer by layer
# ----------------------------------------------------------------------------
class Ported(torch.nn.Module):
    """A linear stack of Keras layers rebuilt in PyTorch (NHWC in, logits out)."""

    def __init__(self, keras_model):
        super().__init__()
        self.ops = []
        self.mods = torch.nn.ModuleList()
        for layer in keras_model.layers:
            kind = type(layer).__name__
            w = [np.asarray(v) for v in layer.get_weights()]
            if kind in ("InputLayer", "Dropout"):
                continue
            if kind == "Normalization":
                mean = torch.tensor(np.asarray(layer.mean).reshape(1, -1, 1, 1), dtype=torch.float32)
                std = torch.tensor(np.maximum(np.sqrt(np.asarray(layer.variance)),
                                              keras.backend.epsilon()).reshape(1, -1, 1, 1),
                                   dtype=torch.float32)
                self.ops.append(("affine", (mean, std)))
            elif kind == "ZeroPadding2D":
                (top, bottom), (left, right) = layer.padding
                self.ops.append(("pad", (left, right, top, bottom)))
            elif kind == "Conv2D":
                if layer.padding != "valid" or layer.dilation_rate != (1, 1) or layer.groups != 1:
                    raise SystemExit(f"layer {layer.name}: only 'valid' undilated convolutions")
                conv = torch.nn.Conv2d(w[0].shape[2], w[0].shape[3], w[0].shape[:2],
                                       stride=layer.strides, bias=layer.use_bias)
                with torch.no_grad():
                    conv.weight.copy_(torch.from_numpy(w[0].transpose(3, 2, 0, 1).copy()))
                    if layer.use_bias:
                        conv.bias.copy_(torch.from_numpy(w[1]))
                self.mods.append(conv)
                self.ops.append(("mod", conv))
                self._activation(layer)
            elif kind == "ReLU":
                self.ops.append(("relu", None))
            elif kind == "Activation":
                self._activation(layer)
            elif kind == "MaxPooling2D":
                if layer.padding != "valid":
                    raise SystemExit(f"layer {layer.name}: only 'valid' pooling")
                self.ops.append(("maxpool", (layer.pool_size, layer.strides)))
            elif kind == "Flatten":
                self.ops.append(("flatten", None))
            elif kind == "Dense":
                lin = torch.nn.Linear(w[0].shape[0], w[0].shape[1], bias=layer.use_bias)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w[0].T.copy()))
                    if layer.use_bias:
                        lin.bias.copy_(torch.from_numpy(w[1]))
                self.mods.append(lin)
                self.ops.append(("mod", lin))
                self._activation(layer)
            else:
                raise SystemExit(f"layer {layer.name}: {kind} is not supported by this port")

    def _activation(self, layer):
        name = getattr(layer.activation, "__name__", "linear")
        if name == "relu":
            self.ops.append(("relu", None))
        elif name != "linear":
            raise SystemExit(f"layer {layer.name}: activation {name} is not supported")

    def forward(self, x):  # x: NCHW (torchattacks' layout)
        h = x
        for op, arg in self.ops:
            if op == "affine":
                h = (h - arg[0]) / arg[1]
            elif op == "pad":
                h = F.pad(h, arg)
            elif op == "mod":
                h = arg(h)
            elif op == "relu":
                h = F.relu(h)
            elif op == "maxpool":
                h = F.max_pool2d(h, arg[0], arg[1])
            elif op == "flatten":
                h = h.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
        return h


def torch_autoattack(net, eps, version, n_classes, seed=0):
    if version == "shipped":
        return torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard",
                                       n_classes=n_classes, seed=seed)
    # AutoAttack's standard version with its own settings (100 iterations).
    from torchattacks.wrappers.multiattack import MultiAttack
    return MultiAttack([
        torchattacks.APGD(net, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce",
                          seed=seed),
        torchattacks.APGDT(net, norm="Linf", eps=eps, steps=100, n_restarts=1,
                           n_classes=n_classes, seed=seed),
        torchattacks.FAB(net, norm="Linf", eps=eps, steps=100, n_restarts=1,
                         multi_targeted=True, n_classes=n_classes, seed=seed),
        torchattacks.Square(net, norm="Linf", eps=eps, n_queries=5000, n_restarts=1,
                            seed=seed),
    ])


def _time_stages(atk, seconds):
    """Wraps the ``forward`` of each attack inside ``atk``'s MultiAttack so that
    ``seconds[name]`` accumulates its wall time (for the per-stage table)."""
    multi = getattr(atk, "_autoattack", atk)
    for attack in getattr(multi, "attacks", []):
        name = type(attack).__name__
        inner = attack.forward

        def timed(*a, _inner=inner, _name=name, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start

        attack.forward = timed


def run_torch(net, x, y, eps, version, n_classes, batch_size, stages=None):
    """(robust verdicts, seconds); ``stages`` (a dict) receives each attack's seconds."""
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(np.array(y))
    start = time.perf_counter()
    robust = []
    for b in range(0, len(x), batch_size):
        atk = torch_autoattack(net, eps, version, n_classes)
        if stages is not None:
            _time_stages(atk, stages)
        adv = atk(xt[b:b + batch_size], yt[b:b + batch_size])
        with torch.no_grad():
            pred = net(adv).argmax(1)
        linf = (adv - xt[b:b + batch_size]).abs().flatten(1).max(1)[0]
        if float(linf.detach().max()) > eps + 1e-5:
            raise SystemExit(f"torchattacks returned a perturbation of {float(linf.max())} > eps")
        robust.append((pred == yt[b:b + batch_size]).numpy())
    return np.concatenate(robust), time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--num_examples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--torch_versions", default="paper,shipped")
    p.add_argument("--ours_only", action="store_true")
    p.add_argument("--jit_compile", action="store_true")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    model = evaluation.load_classifier(args.model_path)
    x, y = data.load_arrays(args.dataset, "test", args.data_dir, num_examples=args.num_examples)
    x = np.asarray(x, np.float32) / 255.0
    y = np.asarray(y, np.int64)
    net = Ported(model).eval()
    with torch.no_grad():
        want = np.asarray(model(x[:256], training=False))
        got = net(torch.from_numpy(x[:256].transpose(0, 3, 1, 2).copy())).numpy()
    gap = float(np.abs(want - got).max())
    print(f"port: logits agree to {gap:.2e} on 256 images")
    if gap > 1e-3:
        raise SystemExit(f"the PyTorch port's logits differ by {gap}")
    n_classes = int(want.shape[-1])

    out = {"model_path": args.model_path, "dataset": args.dataset, "epsilon": args.epsilon,
           "num_examples": len(x), "port_logit_gap": gap, "torch_threads": torch.get_num_threads()}
    report = evaluation.evaluate(model, x, y, args.epsilon, attacks="autoattack",
                                 batch_size=args.batch_size, progress=True,
                                 jit_compile=args.jit_compile, per_example=True)
    ours_robust = np.array(report["per_example"][str(args.epsilon)]["autoattack"])
    out["ours"] = {"robust_accuracy": report["robust_accuracy"],
                   "apgd_ce": report["attacks"][str(args.epsilon)]["apgd_ce"],
                   "seconds": report["seconds"],
                   "images_per_second": len(x) / report["seconds"],
                   "stages": report["preset_stages"][str(args.epsilon)]["autoattack"],
                   "clean_accuracy": report["clean_accuracy"], "jit_compile": args.jit_compile}
    print(evaluation.format_table(report))
    if not args.ours_only:
        for version in args.torch_versions.split(","):
            stages = {}
            robust, secs = run_torch(net, x, y, args.epsilon, version, n_classes,
                                     args.batch_size, stages)
            disagree = int((robust != ours_robust).sum())
            out[f"torchattacks_{version}"] = {
                "robust_accuracy": float(robust.mean()), "seconds": secs,
                "images_per_second": len(x) / secs, "stage_seconds": stages,
                "disagreements": disagree,
                "robust_only_ours": int((ours_robust & ~robust).sum()),
                "robust_only_torchattacks": int((robust & ~ours_robust).sum()),
            }
    print(f"\n{args.model_path}, {args.dataset}, eps={args.epsilon:g}, {len(x)} images")
    print(f"{'':28}{'robust %':>10}{'img/s':>9}{'ours/this':>11}{'disagree':>10}")
    rows = [("ours (autoattack)", out["ours"])] + [
        (f"torchattacks {v}", out[f"torchattacks_{v}"]) for v in args.torch_versions.split(",")
        if f"torchattacks_{v}" in out]
    for name, r in rows:
        speed = out["ours"]["images_per_second"] / r["images_per_second"]
        dis = r.get("disagreements", "")
        print(f"{name:28}{100 * r['robust_accuracy']:>10.2f}{r['images_per_second']:>9.2f}"
              f"{speed:>11.2f}{dis:>10}")
    names = {"apgd_ce": "APGD", "apgd_t": "APGDT", "fab_t": "FAB", "square": "Square"}
    print(f"\nseconds per stage{'':11}" + "".join(f"{n:>9}" for n in names))
    ours = {s["attack"]: s["seconds"] for s in out["ours"]["stages"]}  # a stage may not run
    print(f"{'ours':28}" + "".join(f"{ours.get(n, 0.0):>9.1f}" for n in names))
    for v in args.torch_versions.split(","):
        got = out.get(f"torchattacks_{v}", {}).get("stage_seconds")
        if got:
            print(f"{'torchattacks ' + v:28}"
                  + "".join(f"{got.get(t, 0.0):>9.1f}" for t in names.values()))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(out, indent=2))
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
