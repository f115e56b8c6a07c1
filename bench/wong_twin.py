#!/usr/bin/env python3
"""Wong et al.'s MNIST FGSM-RS training loop in PyTorch, fed our run's randomness.

    python bench/wong_twin.py --seed=0 [--noise=ours|torch|numpy|ours_shift]
        [--init=ours|torch] [--order=ours|torch] [--adam=torch|keras]
        [--out=runs/wong_twin] [--evaluate]

Why: `experiments/mnist_fgsm_rs_wong.flags` trains the same network with the
same attack, schedule and initialisation distribution as their
``MNIST/train_mnist.py``, yet its seeds end far lower (docs/RESULTS.md).
This twin separates the trainer from its random streams. It is an ordinary
PyTorch loop with their algorithm (random start U(-eps, eps) without a clip,
one FGSM step of 0.375, projection; CE on the clipped point; Adam with the
cyclic learning rate; batch 100, 10 epochs) and takes, one switch at a time,
our trainer's random streams instead of PyTorch's:

* ``--init=ours``: the initial weights of ``bin/train``'s model for the seed
  (``train_lib.build_model``, ``--init=torch``), ported into their net;
* ``--order=ours``: the batches of ``train_lib.train_dataset`` for the seed;
* ``--noise=ours``: the random start our ``fgsm_rs`` draws at each step (the
  ``rng`` stream of ``RobustModel.step_seed``); ``ours_shift`` the same hash
  keyed on step + 100000 (other numbers, same generator); ``numpy`` NumPy's
  Mersenne twister; ``torch`` PyTorch's generator, as in their script.

With everything ours, the twin is our trainer with a PyTorch Adam: if it
ends where ``bin/train`` ends, the trainer is not the cause. The trained net
is ported to ``model.keras`` (``wong_reference.port``) and, with
``--evaluate``, scored by ``bin/evaluate`` with their attack (PGD-50, step
0.01, 10 restarts, first 1000 test images). Needs ``pip install
torch==2.13.0`` (a benchmark dependency, not the package's). Runs on one
thread per framework (several twins share the 2 cores better that way).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
torch.set_num_threads(1)

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import wong_reference  # noqa: E402

from tf_backsmooth import config as config_lib  # noqa: E402
from tf_backsmooth import rng, train_lib  # noqa: E402

EPS, ALPHA, BATCH, EPOCHS, STEPS_PER_EPOCH = 0.3, 0.375, 100, 10, 600


def make_net():
    """Their ``mnist_net`` (same layers, built here)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def keras_to_torch(base, net):
    w = {layer.name: layer.get_weights() for layer in base.layers if layer.get_weights()}
    conv = lambda k: np.transpose(k, (3, 2, 0, 1))  # noqa: E731  HWIO -> OIHW
    # fc1 reads NHWC (7, 7, 32) here and NCHW (32, 7, 7) in PyTorch.
    fc1 = w["fc1"][0].reshape(7, 7, 32, 100).transpose(3, 2, 0, 1).reshape(100, 32 * 49)
    sd = {"0.weight": conv(w["conv1"][0]), "0.bias": w["conv1"][1],
          "2.weight": conv(w["conv2"][0]), "2.bias": w["conv2"][1],
          "5.weight": fc1, "5.bias": w["fc1"][1],
          "7.weight": w["logits"][0].T, "7.bias": w["logits"][1]}
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    x = np.random.RandomState(1).rand(4, 28, 28, 1).astype(np.float32)
    gap = np.abs(np.asarray(base(x)) - net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
                 .detach().numpy()).max()
    if gap > 1e-4:
        raise SystemExit(f"init port: logits differ by {gap}")


class KerasAdam:
    """Keras 3's Adam update (epsilon added to sqrt(v) before the bias correction)."""

    def __init__(self, params, eps=1e-7, b1=0.9, b2=0.999):
        self.params = list(params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.eps, self.b1, self.b2, self.t = eps, b1, b2, 0

    @torch.no_grad()
    def step(self, lr):
        self.t += 1
        alpha = lr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            m.add_((p.grad - m) * (1 - self.b1))
            v.add_((p.grad * p.grad - v) * (1 - self.b2))
            p.sub_(m * alpha / (v.sqrt() + self.eps))


def batches(args, cfg, info, train):
    if args.order == "ours":
        ds, _ = train_lib.train_dataset(train[0], train[1], info, BATCH, cfg.seed, 0, EPOCHS,
                                        False)
        for xb, yb in ds:
            yield (torch.from_numpy(xb.numpy().transpose(0, 3, 1, 2).copy()),
                   torch.from_numpy(yb.numpy().astype(np.int64)))
        return
    xs = torch.from_numpy(train[0].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xs, torch.from_numpy(train[1].astype(np.int64))),
        batch_size=BATCH, shuffle=True)
    for _ in range(EPOCHS):
        yield from loader


def train(args, out):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    cfg = config_lib.TrainConfig(
        dataset="mnist", data_dir=args.mnist_dir, validation_size=0, eval_every=0,
        model="mnist_cnn", normalize=False, init="torch", method="fgsm_rs", epsilon=EPS,
        step_size=ALPHA, method_kwargs={"clip_start": False}, epochs=EPOCHS, batch_size=BATCH,
        optimizer="adam", lr=0.005, lr_schedule="cyclic", seed=args.seed,
        model_dir=str(out / "unused"))
    info, data, _, _ = train_lib.load_data(cfg)
    net = make_net()  # PyTorch's own init (drawn after manual_seed, as in their script)
    if args.init == "ours":
        keras_to_torch(train_lib.build_model(cfg, info, STEPS_PER_EPOCH).base_model, net)
    schedule = train_lib.make_schedule(cfg, STEPS_PER_EPOCH)  # step k uses schedule(k)
    opt = (torch.optim.Adam(net.parameters(), lr=cfg.lr) if args.adam == "torch"
           else KerasAdam(net.parameters()))
    numpy_rng = np.random.RandomState(1000 + args.seed)

    @tf.function
    def our_noise(step):  # the start fgsm_rs draws: RobustModel.step_seed, stream 1
        seed = rng.fold_in(rng.fold_in(rng.fold_in(tf.constant([cfg.seed, 0]), step), 0), 1)
        return tf.transpose(rng.uniform([BATCH, 28, 28, 1], seed, -EPS, EPS), [0, 3, 1, 2])

    start, acc = time.time(), []
    for k, (x, y) in enumerate(batches(args, cfg, info, data)):
        if args.noise == "ours":
            delta = torch.from_numpy(our_noise(tf.constant(k)).numpy())
        elif args.noise == "ours_shift":
            delta = torch.from_numpy(our_noise(tf.constant(k + 100000)).numpy())
        elif args.noise == "numpy":
            delta = torch.from_numpy(numpy_rng.uniform(-EPS, EPS, x.shape).astype(np.float32))
        else:
            delta = torch.zeros_like(x).uniform_(-EPS, EPS)
        delta.requires_grad = True
        grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x + delta), y), delta)
        delta = torch.clamp(delta.detach() + ALPHA * torch.sign(grad), -EPS, EPS)
        delta = torch.max(torch.min(1 - x, delta), -x)
        logits = net(torch.clamp(x + delta, 0, 1))
        loss = torch.nn.functional.cross_entropy(logits, y)
        net.zero_grad()
        loss.backward()
        lr = float(schedule(k))
        if args.adam == "torch":
            opt.param_groups[0]["lr"] = lr
            opt.step()
        else:
            opt.step(lr)
        acc.append(float((logits.argmax(1) == y).float().mean()))
        if (k + 1) % STEPS_PER_EPOCH == 0:
            print(f"epoch {(k + 1) // STEPS_PER_EPOCH}: lr {lr:.5f}, accuracy on the training "
                  f"attack {np.mean(acc[-STEPS_PER_EPOCH:]):.4f}, {time.time() - start:.0f} s",
                  flush=True)
    torch.save(net.state_dict(), out / "twin.pth")
    wong_reference.port(out / "twin.pth", out / "model.keras")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="ours", choices=["ours", "ours_shift", "numpy", "torch"])
    p.add_argument("--init", default="ours", choices=["ours", "torch"])
    p.add_argument("--order", default="ours", choices=["ours", "torch"])
    p.add_argument("--adam", default="torch", choices=["torch", "keras"])
    p.add_argument("--out", default="runs/wong_twin")
    p.add_argument("--mnist_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--evaluate", action="store_true")
    args = p.parse_args()
    name = f"noise-{args.noise}_init-{args.init}_order-{args.order}_adam-{args.adam}_s{args.seed}"
    out = REPO / args.out / name
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model.keras").exists():
        train(args, out)
    report = out / "eval_wong.json"
    if args.evaluate and not report.exists():
        wong_reference.evaluate(out, args.mnist_dir, report)
    if report.exists():
        r = json.loads(report.read_text())
        print(json.dumps({"run": name, "clean": r["clean_accuracy"],
                          "pgd50x10": r["robust_accuracy"]}))


if __name__ == "__main__":
    main()
