"""Two local worker processes under MultiWorkerMirroredStrategy (TF_CONFIG on
127.0.0.1): they train Backward Smoothing in lockstep, end with identical
weights, and only the chief writes outputs."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multi_device]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.timeout(300)
def test_two_workers_identical_weights_and_chief_only_outputs(tmp_path, mnist_dir):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "run"
    args = [sys.executable, str(REPO / "bin" / "train"), "--strategy=multi_worker",
            "--dataset=mnist", f"--data_dir={mnist_dir}", "--model=mlp",
            "--method=backward_smoothing", "--epsilon=0.1", "--epochs=2",
            "--batch_size=64", "--num_train_examples=512", "--eval_examples=100",
            "--eval_pgd_steps=3", "--test_examples=200", "--test_pgd_steps=3",
            "--verbose=2", f"--model_dir={model_dir}"]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
    finally:
        for proc in procs:  # bounded: never leave a worker behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    fingerprints = [next(ln for ln in out.splitlines() if ln.startswith("weights sha256"))
                    for out, _ in outputs]
    assert fingerprints[0] == fingerprints[1]
    results = json.loads((model_dir / "results.json").read_text())
    assert fingerprints[0].endswith(results["weights_sha256"])
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["num_replicas"] == 2 and manifest["strategy"] == "multi_worker"
    # Only the chief (worker 0) wrote: one line per epoch, one events writer.
    epochs = [json.loads(ln)["epoch"] for ln in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    per_dir = {os.path.basename(root): [f for f in files if "tfevents" in f]
               for root, _, files in os.walk(model_dir / "tensorboard")}
    assert {d for d, f in per_dir.items() if f} == {"train", "validation", "images"}
    assert all(len(f) <= 1 for f in per_dir.values()), per_dir  # one writer each
