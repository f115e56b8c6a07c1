#!/usr/bin/env python3
"""Wong et al.'s own MNIST FGSM-RS training script as an outside reference.

    python bench/wong_reference.py --snapshot=DIR [--seeds=0,1,2] [--out=runs/wong_reference]
                                   [--evaluate]

``DIR`` is a git snapshot of github.com/locuslab/fast_adversarial (the search
tool's ``fetch`` gives one; nothing of it is copied into this repository). For
each seed this runs their unmodified ``MNIST/train_mnist.py`` (defaults: FGSM,
eps 0.3, alpha 0.375, Adam cyclic lr 5e-3, batch 100, 10 epochs) on the CPU in
PyTorch, then ports the trained ``mnist_net`` weights into our ``mnist_cnn``
(``normalize=False``: their net sees raw pixels) and saves ``model.keras``,
so that ``bin/evaluate`` scores their models and ours with the same attack.
Their released ``MNIST/models/fgsm.pth`` is ported too (``released``). With
``--evaluate`` every ported model gets their attack (PGD-50, step 0.01, 10
restarts, first 1000 test images) through ``bin/evaluate``. With
``--failure_check`` each of their trained models also gets the measurement of
our ``--failure_restarts --failure_data=train`` check (PGD-``--failure_pgd_steps`` on
the 1000 training images ``train_lib.make_failure_detector`` picks for that
seed, as ``callbacks.FailureDetector`` runs it) next to the FGSM training
accuracy of their last epoch (read from their log, ``fgsm_s<seed>.log``; runs
trained before 55c1ed2 have no log and get the PGD accuracy only): would
our check have restarted their run?

Only the environment is adapted, not their code: ``.cuda()`` becomes a no-op
and ``torchvision.datasets.MNIST`` is replaced by a reader of the canonical IDX
files (torchvision's wheel does not import beside the CPU torch here). Needs
``pip install torch==2.13.0`` (a benchmark dependency, not the package's).
"""

import argparse
import gzip
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fake_torchvision(mnist_dir):
    """``torchvision.datasets.MNIST(train=True)`` and ``transforms.ToTensor``
    over the IDX files, with the tensors ToTensor would give."""
    import torch

    class MNIST(torch.utils.data.Dataset):
        def __init__(self, root, train=True, download=False, transform=None):
            prefix = "train" if train else "t10k"
            self.x = torch.from_numpy(_idx(mnist_dir / f"{prefix}-images-idx3-ubyte.gz").copy())
            self.y = torch.from_numpy(_idx(mnist_dir / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return (self.x[i].float() / 255.0).unsqueeze(0), int(self.y[i])

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(MNIST=MNIST)
    tv.transforms = types.SimpleNamespace(ToTensor=lambda: None)
    return tv


def train_reference(snapshot, seed, out, mnist_dir):
    """Runs their train_mnist.py for ``seed``; returns the .pth path."""
    import logging

    import torch

    target = out / f"fgsm_s{seed}.pth"
    if target.exists():
        return target
    # Their script logs its epoch table through its module's logger; keep a
    # copy (on that logger, so their own basicConfig still prints it).
    handler = logging.FileHandler(out / f"fgsm_s{seed}.log", mode="w")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("train_mnist").addHandler(handler)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "MNIST"
        src.mkdir()
        for name in ("train_mnist.py", "mnist_net.py"):
            text = subprocess.run(["git", "--git-dir", str(snapshot), "show", f"HEAD:MNIST/{name}"],
                                  capture_output=True, text=True, check=True).stdout
            (src / name).write_text(text)
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
        tv = _fake_torchvision(mnist_dir)
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.datasets"] = tv.datasets
        sys.modules["torchvision.transforms"] = tv.transforms
        sys.path.insert(0, str(src))
        sys.modules.pop("train_mnist", None)
        import train_mnist  # noqa: E402  (their script, unmodified)
        sys.argv = ["train_mnist.py", "--fname", str(target), "--seed", str(seed)]
        start = time.time()
        try:
            train_mnist.main()
        finally:
            logging.getLogger("train_mnist").removeHandler(handler)
            handler.close()
        sys.path.remove(str(src))
        print(f"their script, seed {seed}: {time.time() - start:.0f} s", flush=True)
    return target


def port(pth, keras_path):
    """Their mnist_net state dict -> our mnist_cnn (raw pixels) -> model.keras."""
    import torch

    from tf_backsmooth import models

    sd = {k: v.numpy() for k, v in torch.load(pth, map_location="cpu").items()}
    model = models.get("mnist_cnn", 10, (28, 28, 1))  # mean 0, std 1: raw pixels
    conv = lambda w: np.transpose(w, (2, 3, 1, 0))  # noqa: E731  OIHW -> HWIO
    # fc1 reads a flattened NCHW (32, 7, 7) map in PyTorch, NHWC (7, 7, 32) here.
    fc1 = sd["5.weight"].reshape(100, 32, 7, 7).transpose(2, 3, 1, 0).reshape(7 * 7 * 32, 100)
    model.get_layer("conv1").set_weights([conv(sd["0.weight"]), sd["0.bias"]])
    model.get_layer("conv2").set_weights([conv(sd["2.weight"]), sd["2.bias"]])
    model.get_layer("fc1").set_weights([fc1, sd["5.bias"]])
    model.get_layer("logits").set_weights([sd["7.weight"].T, sd["7.bias"]])
    # Logits agree with the PyTorch net (same layers as their mnist_net).
    x = np.random.RandomState(0).rand(8, 1, 28, 28).astype(np.float32)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 4, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 4, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(32 * 7 * 7, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    net.load_state_dict(torch.load(pth, map_location="cpu"))
    want = net(torch.from_numpy(x)).detach().numpy()
    got = np.asarray(model(np.transpose(x, (0, 2, 3, 1))))
    gap = float(np.abs(got - want).max())
    if gap > 1e-4:
        raise SystemExit(f"port of {pth}: logits differ by {gap}")
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(keras_path)
    return gap


def evaluate(run_dir, mnist_dir, report):
    """Their attack through ``bin/evaluate``: PGD-50, step 0.01, 10 restarts,
    the first 1000 test images; the JSON report goes to ``report``."""
    subprocess.run([sys.executable, "bin/evaluate", f"--model_path={run_dir}", "--dataset=mnist",
                    f"--data_dir={mnist_dir}", "--epsilon=0.3", "--attacks=pgd",
                    "--pgd_steps=50", "--step_size=0.01", "--restarts=10",
                    "--num_examples=1000", "--progress=false", f"--output={report}"],
                   cwd=REPO, check=True)


def last_train_accuracy(log_path):
    """Train Acc of the last epoch row of their log (``epoch time lr loss acc``)."""
    acc = None
    for line in log_path.read_text().splitlines():
        fields = line.split(" - ")[-1].split()
        if len(fields) == 5 and fields[0].isdigit():
            acc = float(fields[4])
    return acc  # None: no epoch rows (a run trained before the log was kept)


def failure_check(keras_path, seed, mnist_dir, pgd_steps):
    """Our ``--failure_data=train`` check's PGD accuracy on their model."""
    import keras

    from tf_backsmooth import callbacks, train_lib
    from tf_backsmooth import config as config_lib
    from tf_backsmooth import data as data_lib

    config = config_lib.TrainConfig(dataset="mnist", seed=seed, epsilon=0.3,
                                    failure_data="train", validation_size=0,
                                    failure_pgd_steps=pgd_steps)
    train = data_lib.load_arrays("mnist", "train", str(mnist_dir), validation_size=0)
    detector = train_lib.make_failure_detector(config, train)
    assert isinstance(detector, callbacks.FailureDetector)
    return detector.robust_accuracy(keras.models.load_model(keras_path))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshot", required=True, help="git dir of a locuslab/fast_adversarial snapshot")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/wong_reference")
    p.add_argument("--mnist_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--failure_check", action="store_true",
                   help="also measure our --failure_data=train check on their models")
    p.add_argument("--failure_pgd_steps", type=int, default=20,
                   help="the check's PGD steps (experiments/mnist_fgsm_rs_wong.flags: 20)")
    args = p.parse_args()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    snapshot = pathlib.Path(args.snapshot)
    mnist_dir = pathlib.Path(args.mnist_dir)
    released = out / "released.pth"
    if not released.exists():
        blob = subprocess.run(["git", "--git-dir", str(snapshot), "show", "HEAD:MNIST/models/fgsm.pth"],
                              capture_output=True, check=True).stdout
        released.write_bytes(blob)
    pths = {"released": released}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        pths[f"script_s{seed}"] = train_reference(snapshot, seed, out, mnist_dir)
    summary = {}
    for name, pth in pths.items():
        run = out / name
        gap = port(pth, run / "model.keras")
        entry = {"pth": str(pth), "logit_gap": gap}
        report = run / "eval_wong.json"
        if args.evaluate and not report.exists():
            evaluate(run, mnist_dir, report)
        if report.exists():
            r = json.loads(report.read_text())
            entry.update(clean=r["clean_accuracy"], pgd50x10=r["robust_accuracy"])
        log = out / f"fgsm_s{name[len('script_s'):]}.log"
        if args.failure_check and name.startswith("script_s") and log.exists():
            seed = int(name[len("script_s"):])
            train_acc = last_train_accuracy(log)
            robust = failure_check(run / "model.keras", seed, mnist_dir, args.failure_pgd_steps)
            entry.update(last_epoch_train_acc=train_acc, failure_check_pgd=robust,
                         failure_check_pgd_steps=args.failure_pgd_steps)
            if train_acc is not None:
                entry["failure_check_gap"] = round(train_acc - robust, 4)
        summary[name] = entry
        print(name, json.dumps(entry), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
