#!/usr/bin/env python3
"""Our Backward Smoothing step against PyTorch's, same network, one run.

    pip install torch==2.13.0        # CPU build; bench/ only, not a package dependency
    python bench/vs_pytorch.py [--nets=small_cnn,resnet18] [--tf_modes=graph,auto]
                               [--rounds=3] [--steps_small=10] [--steps_resnet=2]
                               [--precisions=float32[,bfloat16]]
                               [--official=DIR] [--emulate_avx2]

Networks and budgets:

* ``small_cnn``: the TRADES MNIST SmallCNN, batch 128, 28x28x1, eps 0.3;
* ``resnet18``: ``models.get("resnet18")`` against the torchvision-style CIFAR
  ResNet-18 written below (3x3 stride-1 stem, no max-pool, BasicBlocks 2-2-2-2,
  widths 64-512, 1x1 projection shortcuts, BatchNorm), batch 32, 32x32x3,
  eps 8/255.

Two PyTorch references, on the same PyTorch networks:

* ``torch`` (the twin): the ordinary step written here (``torch_bs_step``):
  ``model.eval()`` for the attack, the clean logits taken from the backward
  step's own forward pass (the strongest plain version), ``model.train()`` for
  the loss, one ``optimizer.step()``. The training passes on ``x`` and ``x'``
  are one call on the concatenated batch for SmallCNN (no BatchNorm: exact,
  and faster) and two calls for the ResNet (each pass normalises with its own
  batch statistics, as in the TRADES/BS code and as ``RobustModel`` does).
* ``official`` (with ``--official=DIR``): the authors' own
  ``trades_backward.training_loss`` from jinghuichen/BackwardSmoothing, read
  from ``DIR/trades_backward.py`` of a clone of that repository (it is never
  copied into this tree), then ``loss.backward()`` and ``optimizer.step()`` as
  their ``train_trades_backward.py`` does. It draws its logit noise with
  ``.cuda()``, which this benchmark maps to the CPU tensor itself.

The step on every side: Backward Smoothing with step size eps, gamma 1, one
TRADES step, loss CE + 6 KL, SGD(0.01, momentum 0.9). PyTorch runs eager,
NCHW, ``torch.set_num_threads(<cores>)``, on pre-built tensors; our side runs
``model.fit`` on an in-memory dataset (``step_cost.bench_dataset``), so it also
pays Keras' per-call set-up.

Each ``--tf_modes`` entry is a ``jit_compile`` value for ``RobustModel.compile``:
``graph`` (False), ``xla`` (True), ``auto`` (the package's rule; the printed
line says what it chose and why), ``graph_tfgrad`` (graph mode with
``tf_backsmooth.fastgrad`` off: TensorFlow's own input gradient for the first
convolution), ``graph_kerasbn`` (graph mode with ``tf_backsmooth.fused_bn`` off:
Keras' unfused training-mode BatchNorm), ``graph_fast`` (graph mode with both
forced on, whatever the CPU rule says). Every round times each (network,
framework or TF mode) for its steps, alternating frameworks; the median over
rounds is reported, with ``ours / reference throughput = t_reference / t_ours``.

The header names the CPU's ISA (AVX2 / AVX-512 / AMX) and the kernel state of
both frameworks: oneDNN on or off in TensorFlow (chosen by
``tf_backsmooth.cpu`` at import unless ``TF_ENABLE_ONEDNN_OPTS`` is set), any
ISA cap, and PyTorch's ATen capability. ``--emulate_avx2`` shows an AVX2-only
CPU on an AVX-512 one: it caps oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2``, both
frameworks), XLA (``--xla_cpu_max_isa=AVX2``) and PyTorch's own kernels
(``ATEN_CPU_CAPABILITY=avx2``), and applies the package's oneDNN rule to an
AVX2 CPU's flags; add ``TF_ENABLE_ONEDNN_OPTS=0`` in front to see what
TensorFlow does by itself on such a CPU.

``--precisions`` (default ``float32``): ``bfloat16`` times both sides again in
bfloat16 mixed precision, in the same rounds: ours under the Keras dtype policy
``mixed_bfloat16`` (``--dtype_policy`` of ``bin/train``: bfloat16 layers,
float32 variables, the losses in float32), PyTorch under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Worth it on CPUs with
bfloat16 matrix units (AMX, ``lscpu | grep amx``), where oneDNN runs bfloat16
convolutions on them in both frameworks.
"""

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# The CPU-kind decisions happen before PyTorch or TensorFlow load, so they are
# made here, from the command line, ahead of argparse.
EMULATE_AVX2 = "--emulate_avx2" in sys.argv
if EMULATE_AVX2:
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()
    # The package reads an AVX2-only CPU's flags (its rule then acts as there).
    _fake = pathlib.Path(tempfile.mkdtemp()) / "cpuinfo"
    _fake.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n")
    os.environ["TF_BACKSMOOTH_CPUINFO"] = str(_fake)
from tf_backsmooth import cpu  # noqa: E402, I001  (chooses TensorFlow's kernels; no TensorFlow yet)

# PyTorch before TensorFlow (bench/torch_reference.py exits with the install
# command if it is missing), with the per-example KL and the eps-ball clip of
# the PyTorch reference steps.
from torch_reference import F, clip, kl, torch  # noqa: E402, I001

import keras  # noqa: E402
import numpy as np  # noqa: E402
import step_cost  # noqa: E402  (bench/step_cost.py)
import tensorflow as tf  # noqa: E402

from tf_backsmooth import fastgrad, fused_bn, models  # noqa: E402
from tf_backsmooth.robust_model import RobustModel  # noqa: E402

NETS = {  # name: (input HWC, batch, eps)
    "small_cnn": ((28, 28, 1), 128, 0.3),
    "resnet18": ((32, 32, 3), 32, 8 / 255),
}
GAMMA, BETA, LR, MOMENTUM = 1.0, 6.0, 0.01, 0.9
MODES = {"graph": False, "xla": True, "auto": "auto",
         # graph mode with TensorFlow's own Conv2D input gradient in the attack
         # (tf_backsmooth.fastgrad off)
         "graph_tfgrad": False,
         # graph mode with Keras' unfused training-mode BatchNorm
         # (tf_backsmooth.fused_bn off)
         "graph_kerasbn": False,
         # graph mode with both of ours forced on
         "graph_fast": False}
# (fastgrad.ENABLED, fused_bn.ENABLED) while a mode traces; "auto" is the CPU rule.
KERNELS = {"graph_tfgrad": (False, "auto"), "graph_kerasbn": ("auto", False),
           "graph_fast": (True, True)}


# ----------------------------------------------------------------------------
# PyTorch networks (NCHW, as PyTorch code is written)
# ----------------------------------------------------------------------------
class SmallCNN(torch.nn.Module):
    """TRADES' MNIST SmallCNN: conv 32, 32, pool, conv 64, 64, pool, fc 200, dropout, 200, 10."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(64 * 4 * 4, 200), torch.nn.ReLU(), torch.nn.Dropout(0.5),
            torch.nn.Linear(200, 200), torch.nn.ReLU(), torch.nn.Linear(200, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(torch.nn.Module):
    """The CIFAR ResNet-18 of the TRADES / Rice et al. code (torchvision layout, 3x3 stem)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                layers.append(BasicBlock(cin, cout, s))
                cin = cout
        self.layers = torch.nn.Sequential(*layers)
        self.linear = torch.nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------
# The PyTorch Backward Smoothing step
# ----------------------------------------------------------------------------
def torch_bs_step(model, opt, x, y, eps, concat):
    """One Backward Smoothing training step (alpha = eps, gamma 1, 1 TRADES step, beta 6)."""
    model.eval()
    x_in = x.clone().requires_grad_(True)
    logits = model(x_in)
    z = logits.detach()
    u = torch.rand_like(z) * 2 - 1
    (grad,) = torch.autograd.grad(kl(z + GAMMA * u, logits).sum(), x_in)
    x1 = clip(x - eps * grad.sign(), x, eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(kl(z, model(x1)).sum(), x1)
    x_adv = clip(x1.detach() + eps * grad.sign(), x, eps).detach()
    model.train()
    if concat:
        clean, adv = model(torch.cat([x, x_adv])).split(len(x))
    else:
        clean, adv = model(x), model(x_adv)
    loss = (F.cross_entropy(clean, y, reduction="none") + BETA * kl(clean, adv)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def torch_setup(net):
    """The same PyTorch network, optimizer and 4 batches for every reference."""
    shape, batch, eps = NETS[net]
    torch.manual_seed(0)
    model = SmallCNN() if net == "small_cnn" else ResNet18()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    g = torch.Generator().manual_seed(0)
    h, w, c = shape
    batches = [(torch.rand(batch, c, h, w, generator=g),
                torch.randint(0, 10, (batch,), generator=g)) for _ in range(4)]
    return model, opt, batches, eps


def torch_runner(net, precision="float32"):
    model, opt, batches, eps = torch_setup(net)
    concat = net == "small_cnn"

    def cast():
        return (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16"
                else contextlib.nullcontext())

    for i in range(2):  # warm up
        with cast():
            torch_bs_step(model, opt, *batches[i], eps, concat)

    def run(steps):
        start = time.perf_counter()
        for i in range(steps):
            with cast():
                torch_bs_step(model, opt, *batches[i % 4], eps, concat)
        return (time.perf_counter() - start) / steps
    return run


# ----------------------------------------------------------------------------
# Our step
# ----------------------------------------------------------------------------
def tf_runner(net, mode, precision="float32"):
    shape, batch, eps = NETS[net]
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        base = models.get(net, 10, shape)
        model = RobustModel(base, method="backward_smoothing", epsilon=eps)
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM),
                  jit_compile=MODES[mode])
    rs = np.random.RandomState(0)
    x = rs.rand(batch * 4, *shape).astype(np.float32)
    y = rs.randint(0, 10, batch * 4)
    ds = step_cost.bench_dataset(x, y, batch)
    # Both are read while tracing.
    fastgrad.ENABLED, fused_bn.ENABLED = KERNELS.get(mode, ("auto", "auto"))
    try:
        model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace, compile, warm up
        kernels = (f"fastgrad {'on' if fastgrad.enabled() else 'off'}, "
                   f"fused BN {'on' if fused_bn.enabled() else 'off'}")
    finally:
        fastgrad.ENABLED = fused_bn.ENABLED = "auto"
    info = f"{kernels}, xla={'on' if model.xla else 'off'} ({model.xla_reason})"
    return (lambda steps: step_cost.time_steps(model, ds, steps)), info


def load_official(directory):
    """``training_loss`` of the authors' ``trades_backward.py`` in ``directory``
    (a clone of jinghuichen/BackwardSmoothing), imported from there."""
    import importlib.util

    path = pathlib.Path(directory).expanduser() / "trades_backward.py"
    if not path.is_file():
        raise SystemExit(f"--official: no trades_backward.py in {directory} (a clone of "
                         "jinghuichen/BackwardSmoothing)")
    spec = importlib.util.spec_from_file_location("official_trades_backward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Their logit noise is built on the CPU and moved with .cuda(); keep it here.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    return module.training_loss


def official_runner(net, training_loss, precision="float32"):
    """The authors' step: their ``training_loss`` (attack in eval mode, loss in
    train mode, KL with ``size_average=False`` / batch), then backward and step."""
    model, opt, batches, eps = torch_setup(net)

    def step(x, y):
        with (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16"
              else contextlib.nullcontext()):
            loss = training_loss(model, x, y, opt, step_size=eps, epsilon=eps,
                                 perturb_steps=1, beta=BETA, gamma=GAMMA)
        loss.backward()
        opt.step()

    for i in range(2):  # warm up
        step(*batches[i])

    def run(steps):
        start = time.perf_counter()
        for i in range(steps):
            step(*batches[i % 4])
        return (time.perf_counter() - start) / steps
    return run


def kernel_header():
    """The CPU kind and each framework's kernel state, for the table's header."""
    flags = cpu.cpu_flags()
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
            if k in os.environ]
    if "xla_cpu_max_isa" in os.environ.get("XLA_FLAGS", ""):
        caps.append("XLA " + os.environ["XLA_FLAGS"])
    real = cpu.cpu_flags("/proc/cpuinfo")
    lines = [f"CPU: {cpu.isa(real)} ({' '.join(f for f in cpu.REPORTED_FLAGS if f in (real or ()))})"
             + (f"; capped: {', '.join(caps)}" if caps else "")]
    if EMULATE_AVX2:
        lines.append(f"emulating an AVX2-only CPU: tf_backsmooth reads the flags "
                     f"{' '.join(sorted(flags))}")
    used = cpu.onednn_in_use()
    lines.append(f"TensorFlow {tf.__version__}: oneDNN kernels "
                 f"{ {True: 'on', False: 'off', None: 'unknown'}[used]} "
                 f"({cpu.ONEDNN_ENV}={os.environ.get(cpu.ONEDNN_ENV, '<unset>')}; "
                 f"{cpu.choose().source}: {cpu.choose().reason})")
    lines.append(f"PyTorch {torch.__version__}: ATen {torch.backends.cpu.get_cpu_capability()}, "
                 f"oneDNN (mkldnn) {'on' if torch.backends.mkldnn.is_available() else 'off'}")
    return "\n".join(lines)


def load_note():
    try:
        return "load average (1, 5, 15 min) %.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover
        return "load average unavailable"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="small_cnn,resnet18")
    p.add_argument("--tf_modes", default="graph,auto",
                   help="comma list of " + ", ".join(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps_small", type=int, default=10, help="steps per round, SmallCNN")
    p.add_argument("--steps_resnet", type=int, default=2, help="steps per round, ResNet-18")
    p.add_argument("--precisions", default="float32",
                   help="comma list of float32, bfloat16 (mixed precision on both sides)")
    p.add_argument("--official", default=None, metavar="DIR",
                   help="a clone of jinghuichen/BackwardSmoothing: adds their trades_backward "
                   "step as a second reference")
    p.add_argument("--emulate_avx2", action="store_true",
                   help="cap oneDNN, XLA and PyTorch to AVX2 and apply the package's AVX2 rule")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    nets = args.nets.split(",")
    precisions = args.precisions.split(",")
    # A TF entry is "<mode>" in float32, "<mode>@bf16" in bfloat16; the
    # references' "torch" / "official" likewise.
    tags = {"float32": "", "bfloat16": "@bf16"}
    tf_modes = args.tf_modes.split(",")
    bad = (sorted(set(nets) - set(NETS)) + sorted(set(tf_modes) - set(MODES))
           + sorted(set(precisions) - set(tags)))
    if bad:
        raise SystemExit(f"unknown --nets/--tf_modes/--precisions value(s) {bad}")
    official = load_official(args.official) if args.official else None
    refs = ["torch"] + (["official"] if official else [])
    modes = [m + tags[pr] for pr in precisions for m in tf_modes]
    references = [r + tags[pr] for pr in precisions for r in refs]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print("before the run: " + load_note(), flush=True)

    runners, infos = {}, {}
    for net in nets:
        for pr in precisions:
            runners[net, "torch" + tags[pr]] = torch_runner(net, pr)
            if official:
                runners[net, "official" + tags[pr]] = official_runner(net, official, pr)
            for mode in tf_modes:
                key = (net, mode + tags[pr])
                runners[key], infos[key] = tf_runner(net, mode, pr)
                print(f"built {net} tf[{key[1]}]: {infos[key]}", file=sys.stderr, flush=True)
    times = {k: [] for k in runners}
    for r in range(args.rounds):
        for net in nets:
            steps = args.steps_small if net == "small_cnn" else args.steps_resnet
            # Alternate which framework goes first from round to round.
            order = references + modes if r % 2 == 0 else modes + references
            for fw in order:
                times[net, fw].append(runners[net, fw](steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n}/{fw} {t[-1]:.3f}" for (n, fw), t in times.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"\nBackward Smoothing step, median of {args.rounds} alternated rounds; "
          f"TF {tf.__version__} / Keras {keras.__version__} (model.fit), PyTorch "
          f"{torch.__version__} eager ({threads} threads); {os.cpu_count()} CPUs; at the end: "
          f"{load_note()}")
    print(kernel_header())
    head = f"{'network':<11}{'batch':>6}  {'ours':<60}{'ours s':>8}"
    for ref in refs:
        head += f"{ref + ' s':>11}{'/' + ref:>10}"
    print(head + "   (ours/ref = throughput ratio)")
    result = {}
    for net in nets:
        for mode in modes:
            tag = "@bf16" if mode.endswith("@bf16") else ""  # against the same precision
            label = f"{mode}: {infos[net, mode]}"
            row = f"{net:<11}{NETS[net][1]:>6}  {label[:60]:<60}{med[net, mode]:>8.3f}"
            entry = {"ours": med[net, mode], "tf": infos[net, mode]}
            for ref in refs:
                t_ref = med[net, ref + tag]
                row += f"{t_ref:>11.3f}{t_ref / med[net, mode]:>10.2f}"
                entry[ref] = t_ref
                entry[f"ratio_{ref}"] = t_ref / med[net, mode]
            print(row)
            result[f"{net}/{mode}"] = entry
        if set(precisions) == set(tags):
            pairs = [(f"ours {m}", (net, m), (net, m + "@bf16")) for m in tf_modes]
            pairs += [(ref, (net, ref), (net, ref + "@bf16")) for ref in refs]
            print(f"{net}: bfloat16 speed-up over float32 (same run): " + ", ".join(
                f"{name} {med[a] / med[b]:.2f}" for name, a, b in pairs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "kernels": kernel_header(),
                       "median_s_per_step": result,
                       "rounds": {f"{n}/{fw}": t for (n, fw), t in times.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
