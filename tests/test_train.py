"""bin/train: flag validation, run directory, resume after a kill, outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from conftest import REPO, shared_data_dir

from tf_backsmooth import builders, health
from tf_backsmooth import config as config_lib
from tf_backsmooth import flags as tbs_flags
from tf_backsmooth import run_dir as run_dir_lib

# In-process flag and helper tests are fast; every test that runs bin/train (or
# another interpreter) is marked slow.

TRAIN = [sys.executable, str(REPO / "bin" / "train")]


def _parse(*argv):
    fv = flags.FlagValues()
    tbs_flags.define_flags(fv)
    fv(["train", *argv])
    return tbs_flags.config_from_flags(fv)


# ------------------------------------------------------------ flag checking
def test_defaults_parse_to_a_valid_config():
    config = _parse()
    assert config.method == "backward_smoothing" and config.jit_compile == "auto"
    assert _parse("--jit_compile=true", "--lambda_=0.3", "--method=gradalign").method_kwargs == {"lambda_": 0.3}
    wong = _parse("--method=fgsm_rs", "--clip_start=false", "--normalize=false", "--init=torch",
                  "--epsilon_warmup_epochs=0.5")
    assert wong.method_kwargs == {"clip_start": False}
    assert (wong.normalize, wong.init, wong.epsilon_warmup_epochs) == (False, "torch", 0.5)
    assert (config.normalize, config.init, config.epsilon_warmup_epochs) == (True, "keras", 0.0)


@pytest.mark.parametrize("argv,flag", [
    (["--epochs=0"], "epochs"), (["--epochs=-3"], "epochs"),
    (["--batch_size=0"], "batch_size"), (["--lr=0"], "lr"), (["--lr=nan"], "lr"),
    (["--lr=inf"], "lr"), (["--epsilon=0"], "epsilon"), (["--epsilon=8"], "epsilon"),
    (["--epsilon=-0.1"], "epsilon"), (["--epsilon=nan"], "epsilon"),
    (["--step_size=0"], "step_size"), (["--step_size=2"], "step_size"),
    (["--steps=0"], "steps"), (["--gamma=-1"], "gamma"), (["--gamma=nan"], "gamma"),
    (["--beta=-6"], "beta"), (["--beta=inf"], "beta"), (["--momentum=1"], "momentum"),
    (["--weight_decay=-1e-4"], "weight_decay"), (["--seed=-1"], "seed"),
    (["--eval_every=-1"], "eval_every"), (["--eval_examples=0"], "eval_examples"),
    (["--eval_pgd_steps=0"], "eval_pgd_steps"), (["--test_examples=0"], "test_examples"),
    (["--test_pgd_steps=0"], "test_pgd_steps"), (["--num_train_examples=0"], "num_train_examples"),
    (["--test_autoattack_examples=-1"], "test_autoattack_examples"),
    (["--validation_size=-5"], "validation_size"), (["--verbose=3"], "verbose"),
    (["--num_cpu_devices=2"], "num_cpu_devices"), (["--model_dir="], "model_dir"),
    (["--method=natural", "--steps=3"], "natural"),
    (["--co_guard", "--method=natural"], "co_guard"), (["--co_guard_factor=1"], "co_guard_factor"),
    (["--co_guard_factor=0"], "co_guard_factor"), (["--co_guard_every=0"], "co_guard_every"),
    (["--co_guard_examples=0"], "co_guard_examples"), (["--co_guard_gap=1.5"], "co_guard_gap"),
    (["--co_guard_drop=-0.1"], "co_guard_drop"), (["--co_guard_max_collapses=0"], "co_guard_max_collapses"),
    (["--epsilon_warmup_epochs=-1"], "epsilon_warmup_epochs"),
    (["--epsilon_warmup_epochs=11", "--epochs=10"], "epsilon_warmup_epochs"),
    (["--epsilon_warmup_epochs=1", "--method=natural"], "epsilon_warmup_epochs"),
    (["--failure_restarts=1", "--eval_every=0"], "failure_restarts"),
    (["--failure_restarts=-1"], "failure_restarts"), (["--failure_gap=2"], "failure_gap"),
    (["--lr_boundaries=2.5,x"], "lr_boundaries"), (["--lr_boundaries=3,2"], "lr_boundaries"),
    (["--lr_boundaries=0"], "lr_boundaries"), (["--lr_boundaries=10", "--epochs=10"], "lr_boundaries"),
    (["--lr_boundaries=2", "--lr_schedule=cosine"], "lr_boundaries"),
    (["--failure_warmup_gap=0.25"], "failure_warmup_gap"),
    (["--failure_rollback"], "failure_rollback"),
    (["--failure_warmup_gap=2", "--failure_restarts=1", "--epsilon_warmup_epochs=1"],
     "failure_warmup_gap"),
    # No validation split: the check needs --failure_data=train, and says so.
    (["--failure_restarts=1", "--validation_size=0"], "failure_data=train"),
    (["--failure_examples=0"], "failure_examples"),
    (["--failure_from_epoch=-1"], "failure_from_epoch"),
    (["--failure_from_epoch=11", "--epochs=10"], "failure_from_epoch"),
    (["--failure_restarts=1", "--failure_data=train", "--method=natural"], "natural"),
])
def test_rejected_value_names_the_flag(argv, flag):
    with pytest.raises(config_lib.ConfigError, match=flag):
        _parse(*argv)


@pytest.mark.parametrize("argv,flag", [
    (["--method=bogus"], "method"), (["--dataset=imagenet"], "dataset"),
    (["--model=vgg"], "model"), (["--optimizer=rmsprop"], "optimizer"),
    (["--lr_schedule=step"], "lr_schedule"), (["--strategy=tpu"], "strategy"),
    (["--jit_compile=maybe"], "jit_compile"), (["--dtype_policy=float64"], "dtype_policy"),
    (["--epochs=two"], "epochs"), (["--epsilon=abc"], "epsilon"),
    (["--co_guard_policy=panic"], "co_guard_policy"), (["--co_guard_rule=x"], "co_guard_rule"),
    (["--co_guard_fallback=bogus"], "co_guard_fallback"), (["--init=he"], "init"),
    (["--normalize=maybe"], "normalize"), (["--clip_start=maybe"], "clip_start"),
    (["--failure_data=test"], "failure_data"),
])
def test_absl_rejects_bad_types_and_choices(argv, flag):
    with pytest.raises(flags.IllegalFlagValueError, match=flag):
        _parse(*argv)


def _run(args, timeout=300, **kw):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(TRAIN + args, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, **kw)


@pytest.mark.parametrize("args,needle", [
    (["--epochs=0"], "--epochs must be >= 1"),
    (["--method=bogus"], "method"),
    (["--dataset=mnist", "--data_dir=/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--batch_size=100000", "--dataset=mnist", "--num_train_examples=500"], "batch_size"),
])
@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(args, needle, tmp_path, mnist_dir):
    args = [a.replace("--data_dir=/nonexistent", "--data_dir=/nonexistent") for a in args]
    if "--dataset=mnist" in args and not any(a.startswith("--data_dir") for a in args):
        args.append(f"--data_dir={mnist_dir}")
    proc = _run(args + [f"--model_dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr


# ------------------------------------------------------------- real runs
def _tiny(model_dir, mnist_dir, *extra):
    # small_cnn has Dropout: the resume tests also check its masks continue exactly.
    return [f"--data_dir={mnist_dir}", "--dataset=mnist", "--model=small_cnn",
            "--method=backward_smoothing", "--epsilon=0.1", "--epochs=4",
            "--batch_size=128", "--num_train_examples=1024", "--optimizer=adam",
            "--lr=0.003", "--lr_schedule=constant", "--eval_examples=200", "--eval_pgd_steps=5",
            "--test_examples=300", "--test_pgd_steps=5", "--test_autoattack_examples=64",
            "--verbose=2",
            # 24 of the 32 steps ramp epsilon up, so the resume test resumes mid-warm-up.
            "--epsilon_warmup_epochs=3",
            f"--model_dir={model_dir}", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = shared_data_dir("mnist")
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not available")
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    proc = _run(_tiny(run_dir, path, "--curve_every=3", "--curve_examples=64"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


@pytest.mark.slow
def test_run_directory_contents(finished_run):
    run_dir, proc = finished_run
    for name in ("flags.txt", "config.json", "manifest.json", "results.json",
                 "model.keras", "metrics.jsonl", "best.json", "best.weights.h5"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "backup").exists()  # removed after a clean finish
    results = json.loads((run_dir / "results.json").read_text())
    assert 0.4 < results["clean_accuracy"] <= 1 and 0 <= results["robust_accuracy"] <= results["clean_accuracy"]
    assert results["grad_evals"] == 4 * 8 * 128 * 3  # steps x batch x (1 + steps + 1)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["xla"]["used"] is False and "reason" in manifest["xla"]
    assert manifest["attack_conv_input_gradient"].startswith("fastgrad: matmul + col2im")
    assert manifest["training_batchnorm"] == "no BatchNorm layer"  # small_cnn
    assert "--epsilon=0.1" in (run_dir / "flags.txt").read_text()
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    # The epsilon of each epoch's last step (8 steps/epoch, 24-step warm-up).
    np.testing.assert_allclose([r["epsilon"] for r in records],
                               [0.1 * min(1.0, 8 * e / 24) for e in (1, 2, 3, 4)], rtol=1e-5)
    assert "robust test accuracy" in proc.stdout
    assert "autoattack_lite accuracy" in proc.stdout
    # The robustness curve: every 3 epochs and after the last, on 64 test images.
    curve = [r for r in records if "curve_autoattack_lite_accuracy" in r]
    assert [r["epoch"] for r in curve] == [3, 4]
    for r in curve:
        assert 0 <= r["curve_autoattack_lite_accuracy"] <= r["curve_clean_accuracy"] <= 1
        assert r["curve_autoattack_lite_accuracy"] <= r["curve_pgd_accuracy"] + 1 / 64
        assert r["curve_seconds"] > 0 and r["epoch_seconds"] > 0
    assert results["train_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in records))
    # The model card: RobustBench's fields, the cost and where it ran.
    card = results["model_card"]
    assert (card["dataset"], card["threat_model"], card["eps"], card["architecture"]) == (
        "mnist", "Linf", 0.1, "small_cnn")
    assert card["clean_acc"] == round(100 * results["clean_accuracy"], 2)
    assert card["robust_acc"] == round(100 * results["autoattack_lite"]["autoattack_lite_accuracy"], 2)
    assert card["robust_attack"].startswith("autoattack_lite") and card["robust_test_examples"] == 64
    assert (card["train_seconds"], card["grad_evals"]) == (results["train_seconds"], results["grad_evals"])
    assert card["hardware"]["cores"] >= 1 and card["tensorflow"] == manifest["tensorflow"]
    assert card["commit"] == manifest["source_commit"]


@pytest.mark.slow
def test_final_autoattack_measures_the_exported_model_on_the_first_test_images(finished_run,
                                                                                mnist_dir):
    """results.json's autoattack_lite block is PGD-5 and autoattack_lite of the
    exported model on the first 64 test images with the run's seed: the same
    numbers as evaluate() on model.keras and those 64 images alone (its PGD
    verdicts come from the final evaluation of all 300 test images)."""
    from tf_backsmooth import data, evaluation

    run_dir, _ = finished_run
    block = json.loads((run_dir / "results.json").read_text())["autoattack_lite"]
    x, y = data.load_arrays("mnist", "test", str(mnist_dir), num_examples=64)
    model = evaluation.load_classifier(str(run_dir / "model.keras"))
    report = evaluation.evaluate(model, x.astype(np.float32) / 255, y, [0.1],
                                 attacks=("pgd", "autoattack_lite"), pgd_steps=5, seed=0)
    acc = report["attacks"]["0.1"]
    assert block["test_examples"] == 64
    assert (block["clean_accuracy"], block["pgd_accuracy"], block["autoattack_lite_accuracy"],
            block["robust_accuracy"]) == (report["clean_accuracy"], acc["pgd"],
                                          acc["autoattack_lite"], report["robust_accuracy"])
    assert block["robust_accuracy"] < block["clean_accuracy"]  # eps 0.1 breaks some


@pytest.mark.slow
def test_exported_model_loads_with_plain_keras_and_reproduces_accuracy(finished_run, mnist_dir):
    run_dir, _ = finished_run
    from tf_backsmooth import data
    x, y = data.load_arrays("mnist", "test", str(mnist_dir), num_examples=300)
    script = (
        "import sys, numpy as np; sys.modules['tf_backsmooth'] = None; import keras;"
        f"m = keras.models.load_model({str(run_dir / 'model.keras')!r});"
        f"x = np.load({str(run_dir / 'x.npy')!r});"
        "print(float((np.argmax(np.asarray(m(x, training=False)), 1) == np.load("
        f"{str(run_dir / 'y.npy')!r})).mean()))")
    np.save(run_dir / "x.npy", x.astype(np.float32) / 255)
    np.save(run_dir / "y.npy", y)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(results["clean_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_tensorboard_events_hold_scalars_and_images(finished_run):
    import tensorflow as tf
    run_dir, _ = finished_run
    tags, steps = set(), {}
    for root, _, files in os.walk(run_dir / "tensorboard"):
        for name in files:
            if "tfevents" in name:
                for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                    for value in event.summary.value:
                        tags.add((os.path.basename(root), value.tag))
                        steps.setdefault(value.tag, []).append(event.step)
    names = {t for _, t in tags}
    for tag in ("epoch_loss", "epoch_natural_loss", "epoch_robust_loss", "epoch_clean_accuracy",
                "epoch_adv_accuracy", "epoch_learning_rate", "epoch_examples_per_second",
                "epoch_grad_evals", "clean_adversarial_perturbation"):
        assert tag in names, (tag, sorted(tags))
    assert ("validation", "epoch_robust_accuracy") in tags
    # One step convention: images and scalars of epoch e (0-based) at step e.
    assert sorted(steps["epoch_loss"]) == [0, 1, 2, 3]
    assert sorted(steps["clean_adversarial_perturbation"]) == [0, 1, 2, 3]


@pytest.mark.slow
def test_finished_run_is_not_overwritten(finished_run, mnist_dir):
    run_dir, _ = finished_run
    before = (run_dir / "results.json").read_text(), (run_dir / "flags.txt").read_text()
    proc = _run(_tiny(run_dir, mnist_dir), timeout=120)
    assert proc.returncode == 1 and "already holds a finished run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert ((run_dir / "results.json").read_text(), (run_dir / "flags.txt").read_text()) == before


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(finished_run, mnist_dir, tmp_path):
    full_dir, _ = finished_run
    run_dir = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(TRAIN + _tiny(run_dir, mnist_dir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = run_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if meta.exists():
                try:
                    if json.loads(meta.read_text())["epoch"] >= 2:
                        break
                except ValueError:
                    pass
            if proc.poll() is not None:
                pytest.fail("run finished before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("no backup within the time limit")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not (run_dir / "results.json").exists()
    # A different configuration must not resume into this directory.
    clash = _run(_tiny(run_dir, mnist_dir, "--lr=0.01"), timeout=120)
    assert clash.returncode == 1 and "different configuration" in clash.stderr and "lr" in clash.stderr
    resumed = _run(_tiny(run_dir, mnist_dir))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "starting at epoch 2" in resumed.stderr or "starting at epoch 3" in resumed.stderr
    _assert_same_results(run_dir, full_dir)
    records = {json.loads(ln)["epoch"]: json.loads(ln)
               for ln in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert sorted(records) == [1, 2, 3, 4]
    full_records = {json.loads(ln)["epoch"]: json.loads(ln)
                    for ln in (full_dir / "metrics.jsonl").read_text().splitlines()}
    for epoch in (1, 2, 3, 4):  # the resumed run followed the same epsilon schedule
        assert records[epoch]["epsilon"] == pytest.approx(full_records[epoch]["epsilon"])


def _assert_same_results(run_dir, full_dir):
    full = json.loads((full_dir / "results.json").read_text())
    again = json.loads((run_dir / "results.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "epochs", "steps", "grad_evals",
                "weights_sha256"):
        assert again[key] == full[key], key
    epochs = [json.loads(ln)["epoch"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # no epoch twice


def _one_line_error(proc):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("bin/train: error:")]
    return line


@pytest.mark.slow
def test_kill_during_final_evaluation_resumes_into_it(finished_run, mnist_dir, tmp_path):
    """SIGKILL as soon as the final test evaluation starts: the backup is
    still there, so the same command trains no epoch again and writes the
    uninterrupted run's results."""
    full_dir, _ = finished_run
    run_dir = tmp_path / "killed_late"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(TRAIN + _tiny(run_dir, mnist_dir), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "final test evaluation" in line:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not (run_dir / "results.json").exists() and (run_dir / "backup").exists()
    resumed = _run(_tiny(run_dir, mnist_dir))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "starting at epoch 4" in resumed.stderr
    _assert_same_results(run_dir, full_dir)
    assert not (run_dir / "backup").exists()


@pytest.mark.slow
def test_second_run_on_the_same_directory_is_refused(mnist_dir, tmp_path):
    run_dir = tmp_path / "busy"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    first = subprocess.Popen(TRAIN + _tiny(run_dir, mnist_dir), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "config.json").exists():  # written under the lock
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = _run(_tiny(run_dir, mnist_dir), timeout=120)
        line = _one_line_error(second)
        assert f"in use by another run (PID {first.pid} on" in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait(timeout=30)


def _mount_tmpfs(path, options):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")


@pytest.mark.slow
def test_disk_full_exits_with_one_line_and_the_same_command_resumes(finished_run, mnist_dir,
                                                                     tmp_path):
    """On a 7 MB tmpfs the second epoch's checkpoint does not fit: exit 1,
    one line naming the file and the cause (no segfault, no traceback).
    After the tmpfs is enlarged the same command resumes and ends with the
    uninterrupted run's results."""
    full_dir, _ = finished_run
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=7m")
    try:
        run_dir = mount / "run"
        proc = _run(_tiny(run_dir, mnist_dir))
        line = _one_line_error(proc)
        assert "No space left on device" in line and str(run_dir) in line
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = _run(_tiny(run_dir, mnist_dir))
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        _assert_same_results(run_dir, full_dir)
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.slow
def test_invalid_or_unwritable_run_directories_fail_before_training(tmp_path, mnist_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [(blocker / "run", "Not a directory"), (blocker, "exists and is not a directory")]
    locked = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: a read-only tmpfs
        _mount_tmpfs(locked, "ro,size=1m")
        cases += [(locked / "run", "Read-only file system"), (locked, "Read-only file system")]
    else:
        locked.mkdir()
        locked.chmod(0o555)
        cases += [(locked / "run", "Permission denied"), (locked, "Permission denied")]
    try:
        for model_dir, needle in cases:
            proc = _run(_tiny(model_dir, mnist_dir), timeout=120)
            line = _one_line_error(proc)
            assert needle in line and str(model_dir) in line, line
            assert "starting at epoch" not in proc.stderr  # before any training
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)])


@pytest.mark.slow
def test_help_lists_the_project_flags():
    for flag in ("--help", "--helpshort"):
        proc = subprocess.run(TRAIN + [flag], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr  # (absl exits 1 after --help)
        for name in ("--method", "--epsilon", "--model_dir", "--flagfile"):
            assert name in proc.stdout, (flag, name)


@pytest.mark.slow
@pytest.mark.parametrize("program", ["evaluate", "train"])
def test_closed_pipe_ends_quietly(program):
    """`bin/evaluate --help | head`: the reader is gone before the writer."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bin" / program), "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err[-2000:]


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("**/*.flags")),
                         ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_experiment_flagfile_is_valid_and_documented(path):
    text = path.read_text()
    assert f"bin/train --flagfile={path.relative_to(REPO)}" in text
    assert "# Expected" in text or "# Result" in text
    config = _parse(f"--flagfile={path}")
    assert config.model_dir.startswith("runs/")


@pytest.mark.slow
def test_co_guard_run_through_bin_train(tmp_path, mnist_dir):
    run_dir = tmp_path / "guarded"
    proc = _run(_tiny(run_dir, mnist_dir, "--method=fgsm_rs", "--epochs=2", "--co_guard",
                      "--epsilon_warmup_epochs=0",
                      "--co_guard_every=4", "--co_guard_examples=64", "--co_guard_pgd_steps=3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    guard = results["co_guard"]
    assert guard["measurements"] >= 4 and guard["extra_grad_evals"] > 0
    assert results["grad_evals"] == 2 * 8 * 128 * 2 + guard["extra_grad_evals"]
    assert json.loads((run_dir / "manifest.json").read_text())["co_guard"] == guard


def test_robustness_gap_warning(tmp_path):
    """A run that beats its own training attack but not PGD says so."""

    assert health.robustness_gap_warning(str(tmp_path), 0.5) is None  # no metrics yet
    lines = [{"epoch": 1, "adv_accuracy": 0.5}, {"epoch": 2, "adv_accuracy": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert health.robustness_gap_warning(str(tmp_path), 0.85) is None  # healthy (gap 5)
    warning = health.robustness_gap_warning(str(tmp_path), 0.31)  # like a failed BS seed
    assert "90.0 %" in warning and "31.0 %" in warning and "epsilon_warmup_epochs" in warning
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 0.1}) + "\n")
    assert health.robustness_gap_warning(str(tmp_path), 0.0) is None  # natural training


def test_overestimate_warning():
    """PGD more than 10 points above autoattack_lite on the same images is called out."""

    assert health.overestimate_warning(0.85, 0.79, 1000, 20) is None  # a healthy BS run
    assert health.overestimate_warning(0.5, 0.4, 1000, 20) is None  # 10 points: not more
    # N-FGSM with the BS flagfile, seed 1: PGD-20 and autoattack_lite on the same 1000 images.
    warning = health.overestimate_warning(0.456, 0.345, 1000, 20)
    assert "45.6 %" in warning and "34.5 %" in warning and "11.1 points" in warning
    assert "first 1000 test images" in warning and "PGD-20" in warning


@pytest.mark.parametrize("scale", [1.0, 1e5])
def test_final_autoattack_sees_through_masked_gradients(scale):
    """A linear classifier on 4 pixels, label = the brightest pixel by a margin
    of 0.2, eps 0.11: every example is breakable (2 eps > 0.2). At logit scale 1
    PGD and autoattack_lite break them all. At scale 1e5 the softmax is exactly
    one-hot, the cross-entropy's input gradient is exactly 0, so PGD (and
    APGD-CE) cannot move; APGD-T's DLR loss is scale-free and still breaks every
    example, and the final check warns."""
    import tensorflow as tf


    n = 64
    y = np.arange(n) % 4
    x = np.full((n, 4), 0.4, np.float32)
    x[np.arange(n), y] = 0.6

    def model(images):
        return scale * tf.reshape(images, [-1, 4])

    from tf_backsmooth import evaluation

    pgd = evaluation.evaluate(model, x, y, [0.11], attacks=("pgd",), pgd_steps=20, seed=0,
                              per_example=True)
    record, warning = health.final_autoattack(model, x, y, 0.11, health.pgd_verdicts(pgd),
                                                 examples=1000, pgd_steps=20, seed=0)
    assert record["test_examples"] == n and record["clean_accuracy"] == 1.0
    assert record["autoattack_lite_accuracy"] == 0.0 and record["robust_accuracy"] == 0.0
    if scale == 1.0:
        assert record["pgd_accuracy"] == 0.0 and warning is None
    else:
        # A random start alone flips an example only near a corner of the box.
        assert record["pgd_accuracy"] > 0.9 and record["apgd_ce_accuracy"] > 0.9
        assert "overestimates" in warning and "first 64 test images" in warning


def test_config_json_omits_the_final_autoattack_when_off():
    """Runs started before --test_autoattack_examples existed have no such key in
    config.json, so they resume; a run that sets it records it."""

    assert "test_autoattack_examples" not in run_dir_lib.config_payload(_parse())
    assert run_dir_lib.config_payload(_parse("--test_autoattack_examples=1000"))[
        "test_autoattack_examples"] == 1000


def test_wong_flagfile_is_their_recipe_flag_for_flag():
    """experiments/mnist_fgsm_rs_wong.flags pins every setting of Wong et al.'s
    MNIST/train_mnist.py defaults that differs from ours."""
    c = _parse(f"--flagfile={REPO / 'experiments' / 'mnist_fgsm_rs_wong.flags'}")
    assert (c.method, c.epsilon, c.step_size, c.model) == ("fgsm_rs", 0.3, 0.375, "mnist_cnn")
    assert c.method_kwargs == {"clip_start": False}
    assert (c.normalize, c.init) == (False, "torch")
    assert (c.epochs, c.batch_size, c.optimizer, c.lr, c.lr_schedule) == (10, 100, "adam", 0.005, "cyclic")
    assert (c.validation_size, c.eval_every, c.epsilon_warmup_epochs) == (0, 0, 0.0)
    # Not part of their recipe: a finished run that beats its FGSM training attack by more
    # than 20 points over PGD-20 on 1000 training images (the final check's attack) is
    # trained again with a new seed.
    assert (c.failure_restarts, c.failure_data, c.failure_from_epoch, c.failure_gap) == (
        2, "train", 10, 0.2)
    assert (c.failure_examples, c.failure_pgd_steps, c.test_pgd_steps) == (1000, 20, 20)
    assert c.test_autoattack_examples == 1000  # not theirs: the final autoattack_lite check
    # Not theirs (cb6112b): the check also restarts a run whose PGD-20 accuracy on its
    # training images is more than 10 points above autoattack_lite's (gradient masking).
    assert c.failure_overestimate_gap == 0.1
    theirs = _parse(f"--flagfile={REPO / 'experiments' / 'mnist_fgsm_rs_wong.flags'}",
                    "--failure_restarts=0", "--failure_overestimate_gap=1")
    assert theirs.failure_restarts == 0
    with pytest.raises(config_lib.ConfigError, match="add --failure_overestimate_gap=1"):
        _parse(f"--flagfile={REPO / 'experiments' / 'mnist_fgsm_rs_wong.flags'}",
               "--failure_restarts=0")


def test_bs_flagfile_schedule_is_the_recipe_its_header_states():
    """experiments/mnist_backward_smoothing.flags (docs/RESULTS.md; 2cd1669): 460 steps
    per epoch (59 000 training images, batch 128), epsilon ramps to 0.3 over 2 epochs (920
    steps), lr 1e-3 until epoch 2.5 (step 1150) then 1e-4 to the end, and epoch 2 (the one
    that ends the warm-up) is judged with a gap of 0.25, the full-eps epochs with 0.2."""
    import keras

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth import schedules, train_lib
    from tf_backsmooth.robust_model import RobustModel

    c = _parse(f"--flagfile={REPO / 'experiments' / 'mnist_backward_smoothing.flags'}")
    assert (c.method, c.epsilon, c.epochs, c.batch_size, c.optimizer, c.lr) == (
        "backward_smoothing", 0.3, 4, 128, "adam", 0.001)
    assert (c.lr_schedule, c.lr_boundaries, c.epsilon_warmup_epochs) == ("piecewise", (2.5,), 2.0)
    assert (c.failure_restarts, c.failure_gap, c.failure_warmup_gap, c.failure_rollback) == (
        2, 0.2, 0.25, False)
    steps = train_lib.steps_per_epoch(60_000 - 1000, c.batch_size)
    assert steps == 460
    lr = schedules.learning_rate(c, steps)
    assert [float(lr(s)) for s in (0, 1150, 1151, 4 * steps - 1)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4])
    assert schedules.warmup_steps(c.epsilon_warmup_epochs, steps) == 920
    detector = cb.FailureDetector(c.epsilon, c.failure_gap, c.failure_warmup_gap)
    model = RobustModel(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
                        epsilon=c.epsilon, epsilon_schedule=schedules.EpsilonWarmup(c.epsilon, 920))
    model.compile(optimizer="sgd")
    model.optimizer.build(model.trainable_variables)
    detector.set_model(model)
    for begin, end, logs, fails in (
            (0, 460, {"adv_accuracy": 0.91, "val_robust_accuracy": 0.01}, False),  # epoch 1
            (460, 920, {"adv_accuracy": 0.91, "val_robust_accuracy": 0.69}, False),  # gap 0.22
            (460, 920, {"adv_accuracy": 0.91, "val_robust_accuracy": 0.62}, True)):  # gap 0.29
        detector.failed = None
        model.optimizer.iterations.assign(begin)
        detector.on_epoch_begin(0)
        model.optimizer.iterations.assign(end)
        detector.on_epoch_end(0, logs)
        assert (detector.failed is not None) == fails, (begin, logs)


def test_normalize_false_gives_raw_pixels_to_the_network():
    import keras

    from tf_backsmooth import data
    info = data.get_info("mnist")
    x = np.random.RandomState(0).rand(2, 28, 28, 1).astype(np.float32)
    for normalize, expected in ((True, (x - info.mean) / info.std), (False, x)):
        config = config_lib.TrainConfig(dataset="mnist", model="mnist_cnn", normalize=normalize)
        model = builders.make_classifier(config, info)
        first = model.get_layer("normalize")
        np.testing.assert_allclose(keras.ops.convert_to_numpy(first(x)), expected, rtol=1e-5, atol=1e-5)


def test_failure_detector_stops_only_at_full_epsilon_with_a_large_gap():
    import keras

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth import schedules
    from tf_backsmooth.robust_model import RobustModel

    def run(logs, eps=0.3, stop_on_failure=True, step=1000, end_step=None, warmup_gap=None):
        detector = cb.FailureDetector(eps, 0.2, warmup_gap)
        detector.stop_on_failure = stop_on_failure
        model = RobustModel(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
                            epsilon=eps, epsilon_schedule=schedules.EpsilonWarmup(eps, 10))
        model.compile(optimizer="sgd")
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(step)
        detector.set_model(model)
        model.stop_training = False
        detector.on_epoch_begin(2)
        model.optimizer.iterations.assign(step if end_step is None else end_step)
        detector.on_epoch_end(2, logs)
        return detector.failed, model.stop_training

    # BS seed 4 of the MNIST study (bc8e185) at the end of epoch 3: 91.5 % vs 37.2 %.
    failed, stop = run({"adv_accuracy": 0.915, "val_robust_accuracy": 0.372, "epsilon": 0.3})
    assert stop and failed == {"epoch": 3, "adv_accuracy": 0.915, "val_robust_accuracy": 0.372,
                               "end_of_warmup": False}
    assert run({"adv_accuracy": 0.92, "val_robust_accuracy": 0.846, "epsilon": 0.3}) == (None, False)
    # An epoch that starts during the warm-up (step 5 of 10) is not judged, even if
    # it ends at full eps: the model is not meant to be robust there yet.
    assert run({"adv_accuracy": 0.93, "val_robust_accuracy": 0.15}, step=5) == (None, False)
    assert run({"adv_accuracy": 0.93, "val_robust_accuracy": 0.15}, step=9)[1]  # starts at full eps
    assert run({"adv_accuracy": 0.93}) == (None, False)  # no validation this epoch
    # The last attempt allowed: recorded, but training goes on.
    failed, stop = run({"adv_accuracy": 0.915, "val_robust_accuracy": 0.372}, stop_on_failure=False)
    assert failed is not None and not stop


def test_failure_data_train_needs_no_validation_split():
    c = _parse("--failure_restarts=2", "--failure_data=train", "--validation_size=0",
               "--eval_every=0", "--failure_from_epoch=10", "--epochs=10")
    assert (c.failure_data, c.failure_examples, c.failure_from_epoch) == ("train", 1000, 10)
    assert _parse().failure_data == "validation"


def test_failure_pgd_steps_sets_the_training_image_check_attack():
    """--failure_pgd_steps is the PGD-k of the --failure_data=train check (0: the
    eval_pgd_steps default); with a validation split it is rejected by name."""

    train = (np.zeros((50, 4, 4, 1), np.uint8), np.arange(50) % 10)
    base = ("--failure_restarts=2", "--failure_data=train", "--validation_size=0",
            "--eval_every=0")
    c = _parse(*base, "--eval_pgd_steps=7")
    assert c.failure_pgd_steps == 0
    assert health.make_failure_detector(c, train).pgd_steps == 7
    c = _parse(*base, "--eval_pgd_steps=7", "--failure_pgd_steps=20")
    detector = health.make_failure_detector(c, train)
    assert detector.pgd_steps == 20 and len(detector.y) == 50
    with pytest.raises(config_lib.ConfigError, match="failure_pgd_steps"):
        _parse("--failure_restarts=2", "--failure_pgd_steps=20")
    with pytest.raises(config_lib.ConfigError, match="failure_pgd_steps"):
        _parse(*base, "--failure_pgd_steps=-1")


def _linear_detector_model(eps=0.3):
    """logits = 10 x on 2 inputs in [0, 1]: class 0 iff x0 > x1, so a point
    is robust at eps 0.3 (L-inf) iff |x0 - x1| > 0.6."""
    import keras

    from tf_backsmooth.robust_model import RobustModel

    dense = keras.layers.Dense(2)
    model = RobustModel(keras.Sequential([keras.Input((2,)), dense]), epsilon=eps)
    model.compile(optimizer="sgd")
    model.optimizer.build(model.trainable_variables)
    dense.set_weights([10 * np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    return model


def test_failure_detector_on_training_images_measures_pgd_itself():
    """--failure_data=train: the detector attacks its own images. Of the four
    below, two have a margin of 1 (robust at eps 0.3) and two of 0.1 (PGD
    flips them), so the PGD accuracy is 0.5 exactly; with a training-attack
    accuracy of 0.75 the gap is 0.25 > 0.2 (failed), with 0.65 it is 0.15.
    --failure_from_epoch=10 judges (and measures) epoch 10 only."""
    from tf_backsmooth import callbacks as cb

    x = np.array([[1, 0], [0.55, 0.45], [0, 1], [0.45, 0.55]], np.float32)
    y = np.array([0, 0, 1, 1])

    def run(adv, epoch=9, from_epoch=10):
        detector = cb.FailureDetector(0.3, 0.2, from_epoch=from_epoch, x=x, y=y,
                                      pgd_steps=10, seed=0)
        model = _linear_detector_model()
        detector.set_model(model)
        model.stop_training = False
        logs = {"adv_accuracy": adv}
        detector.on_epoch_begin(epoch)
        detector.on_epoch_end(epoch, logs)
        return detector.failed, model.stop_training, logs

    failed, stop, logs = run(0.75)
    assert stop and failed == {"epoch": 10, "adv_accuracy": 0.75,
                               "train_robust_accuracy": 0.5, "end_of_warmup": False}
    assert logs["failure_robust_accuracy"] == 0.5
    failed, stop, logs = run(0.65)
    assert failed is None and not stop and logs["failure_robust_accuracy"] == 0.5
    failed, stop, logs = run(0.75, epoch=8)  # epoch 9 < 10: not judged, not measured
    assert failed is None and not stop and "failure_robust_accuracy" not in logs
    assert run(0.75, epoch=8, from_epoch=0)[1]  # from the first full-eps epoch


@pytest.mark.parametrize("scale", [1.0, 1e5])
def test_failure_detector_fails_a_run_whose_pgd_overestimates_autoattack_lite(scale):
    """--failure_overestimate_gap: the masked linear model of
    test_final_autoattack_sees_through_masked_gradients (4 pixels, eps 0.11,
    every example breakable) as the trained classifier. At logit scale 1e5
    the cross-entropy gradient is exactly 0, so PGD leaves > 90 % robust while
    autoattack_lite breaks all: with a training-attack accuracy of 0.5 the
    accuracy gap cannot fire, but the overestimate does. At scale 1 both
    attacks break everything, so only the accuracy gap fires (0.5 > 0.2).
    Without the option the masked model passes and nothing is logged; the
    score attempts are compared by becomes the worst case of both attacks."""
    import keras

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth.robust_model import RobustModel

    n = 64
    y = np.arange(n) % 4
    x = np.full((n, 4), 0.4, np.float32)
    x[np.arange(n), y] = 0.6

    def judged(overestimate_gap):
        dense = keras.layers.Dense(4)
        model = RobustModel(keras.Sequential([keras.Input((4,)), dense]), epsilon=0.11)
        model.compile(optimizer="sgd")
        model.optimizer.build(model.trainable_variables)
        dense.set_weights([scale * np.eye(4, dtype=np.float32), np.zeros(4, np.float32)])
        detector = cb.FailureDetector(0.11, 0.2, x=x, y=y, pgd_steps=20, seed=0,
                                      overestimate_gap=overestimate_gap)
        detector.set_model(model)
        model.stop_training = False
        logs = {"adv_accuracy": 0.5}
        detector.on_epoch_begin(0)
        detector.on_epoch_end(0, logs)
        return detector, logs

    detector, logs = judged(0.1)
    assert logs["failure_autoattack_accuracy"] == 0.0 and detector.robust_accuracy() == 0.0
    failed = detector.failed
    assert failed is not None and detector.model.stop_training
    assert failed["train_autoattack_accuracy"] == 0.0
    assert failed["overestimated"] == (scale > 1)
    text = health.describe_failure(failed)
    assert "0.0 % under autoattack_lite on the same images" in text
    assert ("gradient masking" in text) == (scale > 1)
    plain, logs = judged(None)
    assert "failure_autoattack_accuracy" not in logs
    if scale > 1:
        assert logs["failure_robust_accuracy"] > 0.9 and plain.failed is None
        assert plain.robust_accuracy() > 0.9
        assert "autoattack_lite" not in health.describe_failure(
            {"adv_accuracy": 0.95, "train_robust_accuracy": 0.056})
    else:
        assert plain.failed == {"epoch": 1, "adv_accuracy": 0.5, "train_robust_accuracy": 0.0,
                                "end_of_warmup": False}
    with pytest.raises(ValueError, match="overestimate_gap"):
        cb.FailureDetector(0.11, 0.2, overestimate_gap=0.1)  # no images of its own


def test_failure_check_does_not_attack_the_same_weights_twice(monkeypatch):
    """FailureDetector.measure keeps its results under a digest of the
    weights: keep_least_bad's score of the last attempt (the weights its judged
    epoch measured, scored after the other attempts') costs no second attack,
    while any change of a weight is measured again, and the kept numbers are
    what the attacks return."""
    import keras

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth import evaluation
    from tf_backsmooth.robust_model import RobustModel

    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.8, (64, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 4)).astype(np.float32) * 4
    y = np.argmax(x @ kernel, axis=1)
    dense = keras.layers.Dense(4)
    model = RobustModel(keras.Sequential([keras.Input((6,)), dense]), epsilon=0.08)
    dense.set_weights([kernel, np.zeros(4, np.float32)])
    detector = cb.FailureDetector(0.08, 0.2, x=x, y=y, pgd_steps=10, seed=3,
                                  overestimate_gap=0.1)
    detector.set_model(model)
    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = detector.measure()
    assert len(calls) == 1 and 0.0 < first["robust"] < 1.0
    assert detector.measure() == first and detector.robust_accuracy() == first["robust"]
    assert len(calls) == 1
    bias = np.zeros(4, np.float32)
    bias[0] = 1e-3  # one weight, slightly
    dense.set_weights([kernel, bias])
    detector.measure()
    assert len(calls) == 2
    dense.set_weights([kernel, np.zeros(4, np.float32)])
    assert detector.measure() == first and len(calls) == 2

def test_failure_check_measures_the_same_under_two_replicas():
    """The check runs as a callback of a MirroredStrategy fit: on a model built
    in a 2-replica scope, its PGD and autoattack_lite accuracies (and their
    worst case) equal those of the same weights on one device, inside the
    scope and outside it. The weights make both attacks break part of the
    images, so a difference in any draw or reduction would show."""
    import contextlib

    import keras
    from conftest import two_replica_strategy

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth.robust_model import RobustModel

    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (96, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 4)).astype(np.float32) * 4
    y = np.argmax(x @ kernel, axis=1)
    y[:12] = (y[:12] + 1) % 4  # a few misclassified images too

    def measured(strategy, inside):
        scope = strategy.scope() if strategy else contextlib.nullcontext()
        with scope:
            dense = keras.layers.Dense(4)
            model = RobustModel(keras.Sequential([keras.Input((6,)), dense]), epsilon=0.08)
            model.compile(optimizer="sgd")
        dense.set_weights([kernel, np.zeros(4, np.float32)])
        detector = cb.FailureDetector(0.08, 0.2, x=x, y=y, pgd_steps=10, seed=3,
                                      batch_size=32, overestimate_gap=0.1)
        detector.set_model(model)
        with strategy.scope() if inside else contextlib.nullcontext():
            return detector.measure()

    one = measured(None, False)
    assert 0.0 < one["autoattack_lite"] < one["pgd"] < 0.875
    assert one["robust"] == one["autoattack_lite"]
    strategy = two_replica_strategy()
    assert measured(strategy, True) == one
    assert measured(strategy, False) == one


def test_failure_overestimate_gap_flag():
    """Off (1) by default and then absent from config.json (older runs
    resume); below 1 it needs restarts on the check's own training images."""

    base = ("--failure_restarts=2", "--failure_data=train", "--validation_size=0",
            "--eval_every=0")
    assert _parse().failure_overestimate_gap == 1.0
    assert "failure_overestimate_gap" not in run_dir_lib.config_payload(_parse(*base))
    c = _parse(*base, "--failure_overestimate_gap=0.1")
    assert run_dir_lib.config_payload(c)["failure_overestimate_gap"] == 0.1
    train = (np.zeros((50, 4, 4, 1), np.uint8), np.arange(50) % 10)
    assert health.make_failure_detector(c, train).overestimate_gap == 0.1
    assert health.make_failure_detector(_parse(*base), train).overestimate_gap is None
    with pytest.raises(config_lib.ConfigError, match="failure_overestimate_gap.*failure_data=train"):
        _parse("--failure_restarts=2", "--failure_overestimate_gap=0.1")
    with pytest.raises(config_lib.ConfigError, match="failure_overestimate_gap"):
        _parse("--failure_overestimate_gap=0.1")  # no restarts
    with pytest.raises(config_lib.ConfigError, match="failure_overestimate_gap"):
        _parse(*base, "--failure_overestimate_gap=1.5")


def test_failure_detector_records_the_last_attempts_failure_for_a_resume(tmp_path):
    """On the last attempt allowed (stop_on_failure False) a failure is
    written to record_path (chief only) and read back by a fresh detector at
    the start of training, as after a kill; earlier attempts neither write
    nor read it."""
    from tf_backsmooth import callbacks as cb

    x = np.array([[1, 0], [0.55, 0.45], [0, 1], [0.45, 0.55]], np.float32)
    y = np.array([0, 0, 1, 1])
    path = str(tmp_path / "failure.json")

    def detector(last, is_chief=True):
        d = cb.FailureDetector(0.3, 0.2, x=x, y=y, pgd_steps=10, seed=0,
                               record_path=path, is_chief=is_chief)
        d.set_model(_linear_detector_model())
        d.model.stop_training = False
        d.stop_on_failure = not last
        return d

    d = detector(last=False)
    d.on_epoch_begin(0)
    d.on_epoch_end(0, {"adv_accuracy": 0.75})
    assert d.failed is not None and d.model.stop_training and not os.path.exists(path)
    d = detector(last=True, is_chief=False)
    d.on_epoch_begin(0)
    d.on_epoch_end(0, {"adv_accuracy": 0.75})
    assert d.failed is not None and not d.model.stop_training and not os.path.exists(path)
    d = detector(last=True)
    d.on_epoch_begin(0)
    d.on_epoch_end(0, {"adv_accuracy": 0.75})
    assert json.loads(open(path).read()) == d.failed and not d.model.stop_training
    resumed = detector(last=True)
    resumed.on_train_begin()
    assert resumed.failed == d.failed
    earlier = detector(last=False)  # an attempt that may still restart
    earlier.on_train_begin()
    assert earlier.failed is None


def test_check_score_measures_a_model_under_the_failure_checks_attack():
    """health.check_score, which compares attempts, measures the given model
    with the check's own attack: on the detector's images (4 points, PGD
    accuracy 0.5 by construction, as in the detector test above) or, without
    them, on the validation split (the same points as uint8 images); a model
    whose logits are swapped scores 0 (the check reads the model passed,
    not the detector's)."""
    import keras

    from tf_backsmooth import callbacks as cb

    x = np.array([[1, 0], [0.55, 0.45], [0, 1], [0.45, 0.55]], np.float32)
    y = np.array([0, 0, 1, 1])
    model = _linear_detector_model()
    swapped = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    swapped.set_weights([10 * np.eye(2, dtype=np.float32)[::-1], np.zeros(2, np.float32)])
    config = config_lib.TrainConfig(epsilon=0.3, eval_pgd_steps=10)
    on_train = cb.FailureDetector(0.3, 0.2, x=x, y=y, pgd_steps=10, seed=0)
    on_train.set_model(_linear_detector_model())
    assert health.check_score(config, on_train, None, model.base_model) == 0.5
    assert health.check_score(config, on_train, None, swapped) == 0.0
    on_val = cb.FailureDetector(0.3, 0.2)
    val = (np.array([[255, 0], [140, 115], [0, 255], [115, 140]], np.uint8), y)
    assert health.check_score(config, on_val, val, model.base_model) == 0.5
    assert health.check_score(config, on_val, val, swapped) == 0.0


def test_failure_keep_flag():
    assert _parse().failure_keep == "best"
    assert _parse("--failure_restarts=1", "--failure_keep=last").failure_keep == "last"
    with pytest.raises(config_lib.ConfigError, match="failure_keep"):
        _parse("--failure_keep=last")  # nothing to choose among without restarts
    with pytest.raises(Exception, match="failure_keep"):
        _parse("--failure_restarts=1", "--failure_keep=worst")


@pytest.mark.parametrize("keep,scores,kept,data", [("best", (0.5, 0.2), 1, "train"),
                                                   ("best", (0.2, 0.2), 2, "train"),
                                                   ("last", None, 2, "train"),
                                                   ("best", (0.5, 0.2), 1, "validation"),
                                                   ("best", (0.2, 0.5), 2, "masked")])
def test_when_every_attempt_fails_the_least_bad_one_is_exported(
        tmp_path, mnist_dir, monkeypatch, keep, scores, kept, data):
    """Both attempts fail (the check's PGD accuracy is forced to -1 and the
    gap to 0); health.check_score is scripted. With --failure_keep=best the
    weights it scores higher are exported -- attempt 1's (its seed, its
    epoch), or on a tie the last attempt's -- with a warning and every score
    in results.json; with 'last' nothing is scored and the last attempt is
    exported. A run killed during its final evaluation and resumed makes the
    same choice (the last attempt's failure is read back from failure.json).
    ``validation``: 2 epochs judged at epoch 2 only, validation accuracy
    scripted to peak at epoch 1, so attempt 1's candidate is its best epoch
    (best.weights.h5, epoch 1), not its newest checkpoint (epoch 2).
    ``masked``: on training images with --failure_overestimate_gap=0 (the
    strictest setting, still on) and a failure_gap no accuracy gap can
    exceed: the attempts fail only because PGD (0.5) overestimates
    autoattack_lite (0.0) on the check's images, and the check named is the
    worst case of both."""
    import keras

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth import evaluation, train_lib

    # Below any training-attack accuracy (2 steps can leave that at 0).
    measured = ({"pgd": 0.5, "autoattack_lite": 0.0, "robust": 0.0} if data == "masked"
                else {"pgd": -1.0, "robust": -1.0})
    monkeypatch.setattr(cb.FailureDetector, "measure", lambda self, model=None: measured)

    def scripted_validation(self, epoch, logs=None):
        logs.update(val_clean_accuracy=1.0, val_robust_accuracy=0.9 if epoch == 0 else -1.0)

    monkeypatch.setattr(cb.RobustValidation, "on_epoch_end", scripted_validation)
    seen = []

    def fake_score(config, detector, val, model):
        assert (detector.x is not None) == (data != "validation")
        seen.append([w.copy() for w in model.get_weights()])
        return scores[(len(seen) - 1) % len(scores)]

    monkeypatch.setattr(health, "check_score", fake_score)
    how = (dict(validation_size=0, eval_every=0, failure_examples=50, epochs=1)
           if data == "train" else
           dict(validation_size=0, eval_every=0, failure_examples=50, epochs=1,
                failure_data="train", failure_overestimate_gap=0.0, failure_gap=1.0)
           if data == "masked" else
           dict(validation_size=64, eval_every=1, eval_examples=64, epochs=2,
                failure_from_epoch=2))
    config = config_lib.TrainConfig(
        dataset="mnist", data_dir=str(mnist_dir), model="mlp", method="fgsm_rs",
        epsilon=0.1, batch_size=64, num_train_examples=128, test_examples=64,
        test_pgd_steps=2, verbose=0, tensorboard=False, failure_restarts=1,
        failure_keep=keep, seed=5, model_dir=str(tmp_path),
        **{"failure_gap": 0.0, "failure_data": data, **how})
    real_evaluate = evaluation.evaluate
    kills = []

    def killed_once(*args, **kwargs):  # a kill during the final evaluation
        if not kills:
            kills.append(1)
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", killed_once)
    with pytest.raises(KeyboardInterrupt):
        train_lib.run(config)
    assert (tmp_path / "failure.json").exists() and not (tmp_path / "results.json").exists()
    first = len(seen)
    results = train_lib.run(config)  # resumes: no epoch left, same choice
    assert results == json.loads((tmp_path / "results.json").read_text())
    exported = keras.saving.load_model(tmp_path / "model.keras").get_weights()
    assert len(results["failed_attempts"]) == 1
    if keep == "last":
        assert seen == [] and results["least_bad"] is None
        assert results["seed"] == run_dir_lib.attempt_seed(5, 1)
        return
    assert first == len(seen) - first == 2  # both attempts scored, before and after the kill
    assert any(not np.array_equal(a, b) for a, b in zip(seen[0], seen[1]))
    for w, ref in zip(exported, seen[len(seen) - 2 + kept - 1]):
        np.testing.assert_array_equal(w, ref)
    check = {"train": "PGD-10 on 50 training images",
             "masked": "PGD-10 and autoattack_lite (worst case) on 50 training images",
             "validation": "PGD-10 on the validation split"}[data]
    assert results["failed_attempts"][0].get("overestimated") == (
        True if data == "masked" else None)
    assert results["least_bad"] == {"kept_attempt": kept, "check": check,
                                    "robust_accuracy": list(scores)}
    assert results["seed"] == (5 if kept == 1 else run_dir_lib.attempt_seed(5, 1))
    assert any("every one of the 2 attempts failed the check" in w
               and "another --seed (the same seed repeats these 2 attempts)" in w for w in results["warnings"])
    assert ("attempt 1 of 2 (epoch 1, in attempt_1/)" in results["selected_weights"]) == (kept == 1)


def test_lr_boundaries_flag_parses_epochs():
    assert _parse().lr_boundaries == () == _parse("--lr_boundaries=").lr_boundaries
    assert _parse("--lr_boundaries=2.5,3").lr_boundaries == (2.5, 3.0)


def test_failure_warmup_gap_defaults_to_never():
    assert _parse().failure_warmup_gap == 1.0
    assert _parse("--failure_warmup_gap=1").failure_warmup_gap == 1.0  # no restarts needed
    c = _parse("--failure_warmup_gap=0.25", "--failure_restarts=2", "--epsilon_warmup_epochs=1")
    assert c.failure_warmup_gap == 0.25


def test_failure_detector_judges_the_end_of_the_warm_up_with_its_own_gap():
    """--failure_warmup_gap: the epoch that starts during the warm-up (step 5 of
    10) and ends at full eps (step 10) is judged with that gap (unjudged
    without it); an epoch that ends
    still warming up (step 8; the step at 9 trains at full eps) is never judged."""
    import keras

    from tf_backsmooth import callbacks as cb
    from tf_backsmooth import schedules
    from tf_backsmooth.robust_model import RobustModel

    def run(val, begin, end, warmup_gap=0.25, adv=0.91):
        detector = cb.FailureDetector(0.3, 0.2, warmup_gap)
        model = RobustModel(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]),
                            epsilon=0.3, epsilon_schedule=schedules.EpsilonWarmup(0.3, 10))
        model.compile(optimizer="sgd")
        model.optimizer.build(model.trainable_variables)
        detector.set_model(model)
        model.stop_training = False
        model.optimizer.iterations.assign(begin)
        detector.on_epoch_begin(1)
        model.optimizer.iterations.assign(end)
        detector.on_epoch_end(1, {"adv_accuracy": adv, "val_robust_accuracy": val})
        return detector.failed, model.stop_training

    # The end-of-warm-up numbers of the MNIST study (626f0e8): BS seed 3's
    # failed attempt (91.0 % vs 62.3 %, gap 0.287) and its healthy restart (gap 0.218).
    failed, stop = run(0.623, 5, 10, adv=0.910)
    assert stop and failed["end_of_warmup"] and failed["epoch"] == 2
    assert failed["val_robust_accuracy"] == pytest.approx(0.623)
    assert run(0.692, 5, 10, adv=0.910) == (None, False)
    assert run(0.623, 5, 8, adv=0.910) == (None, False)  # still warming up at its end
    assert run(0.623, 5, 10, adv=0.910, warmup_gap=None) == (None, False)  # off by default
    assert run(0.0, 5, 10, adv=1.0, warmup_gap=1.0) == (None, False)  # --failure_warmup_gap=1
    assert run(0.623, 5, 10, adv=0.910, warmup_gap=0.3) == (None, False)  # 0.287 < 0.3
    # At full eps the ordinary gap still applies (0.22 > 0.2).
    assert run(0.692, 10, 20, adv=0.910)[1]


@pytest.mark.slow
@pytest.mark.parametrize("judged", ["full_eps", "end_of_warmup"])
def test_failed_run_restarts_with_a_new_seed_and_keeps_the_failed_attempt(tmp_path, mnist_dir, judged):
    """With --failure_gap=0 any epoch whose training-attack accuracy exceeds its
    validation PGD accuracy counts as failed: the first attempt stops after
    epoch 1, its files move to attempt_1/, the second attempt (the last one
    allowed) trains to the end with seed + 1000003, and the costs add up.
    ``end_of_warmup``: the same through --failure_warmup_gap=0 with a 1-epoch
    warm-up (epoch 1 is the end of the warm-up; --failure_gap alone would not
    judge it)."""

    run_dir = tmp_path / "restarts"
    how = (["--epsilon_warmup_epochs=0", "--failure_gap=0"] if judged == "full_eps" else
           ["--epsilon_warmup_epochs=1", "--failure_gap=1", "--failure_warmup_gap=0"])
    # mlp (no Dropout): its training-attack accuracy exceeds the validation PGD
    # accuracy after epoch 1, which this test needs.
    proc = _run(_tiny(run_dir, mnist_dir, "--model=mlp", "--epochs=2",
                      "--failure_restarts=1", "--failure_keep=last", "--seed=5", *how))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FAILED attempt 1 (seed 5) at epoch 1" in proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    (attempt,) = results["failed_attempts"]
    assert attempt["seed"] == 5 and attempt["epoch"] == 1
    assert attempt["end_of_warmup"] == (judged == "end_of_warmup")
    assert attempt["adv_accuracy"] > attempt["val_robust_accuracy"]
    assert results["seed"] == run_dir_lib.attempt_seed(5, 1) == 1_000_008
    assert json.loads((run_dir / "manifest.json").read_text())["seed"] == 1_000_008
    old = [json.loads(ln) for ln in (run_dir / "attempt_1" / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in old] == [1] and [r["epoch"] for r in new] == [1, 2]
    assert results["grad_evals"] == 3 * 128 * 8 * 3  # 1 failed + 2 kept epochs of 8 steps
    assert results["train_seconds"] == pytest.approx(
        sum(r["epoch_seconds"] for r in old + new), rel=1e-6)
    assert json.loads((run_dir / "attempts.json").read_text()) == results["failed_attempts"]


@pytest.mark.slow
def test_failed_run_without_validation_split_restarts_judged_on_training_images(tmp_path, mnist_dir):
    """--failure_data=train with no validation split (--validation_size=0
    --eval_every=0, Wong et al.'s setting): --failure_from_epoch=2 judges only
    the finished 2-epoch run, on PGD against 200 training images; with
    --failure_gap=0 the first attempt fails there, the second (the last one
    allowed) trains both epochs with seed + 1000003 and is kept."""

    run_dir = tmp_path / "train_check"
    proc = _run(_tiny(run_dir, mnist_dir, "--model=mlp", "--epochs=2", "--epsilon_warmup_epochs=0",
                      "--validation_size=0", "--eval_every=0", "--failure_data=train",
                      "--failure_examples=200", "--failure_from_epoch=2", "--failure_gap=0",
                      "--failure_restarts=1", "--failure_keep=last", "--seed=5"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("FAILED attempt 1 (seed 5) at epoch 2" in proc.stderr
            and "under training-image PGD" in proc.stderr), proc.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    (attempt,) = results["failed_attempts"]
    assert attempt["epoch"] == 2 and attempt["seed"] == 5
    assert attempt["adv_accuracy"] > attempt["train_robust_accuracy"]
    assert results["seed"] == run_dir_lib.attempt_seed(5, 1)
    old = [json.loads(ln) for ln in (run_dir / "attempt_1" / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in old] == [1, 2] and [r["epoch"] for r in new] == [1, 2]
    assert "failure_robust_accuracy" not in old[0]  # epoch 1 is not judged
    assert old[1]["failure_robust_accuracy"] == attempt["train_robust_accuracy"]
    assert "val_robust_accuracy" not in old[1]  # no validation split
    assert results["grad_evals"] == 4 * 128 * 8 * 3  # 2 failed + 2 kept epochs of 8 steps


@pytest.mark.slow
def test_failed_attempt_rolls_back_to_the_start_of_its_failed_epoch(tmp_path, mnist_dir):
    """--failure_rollback: the end-of-warm-up epoch 2 fails (gap 0), the next
    attempt (seed + 1000003) starts from the checkpoint of epoch 1, whose
    weights and record it keeps, and trains epochs 2-3; only the discarded
    epoch 2 is the failed attempt's cost, and the costs add up to 4 epochs."""

    run_dir = tmp_path / "rollback"
    proc = _run(_tiny(run_dir, mnist_dir, "--model=mlp", "--epochs=3",
                      "--epsilon_warmup_epochs=2", "--failure_gap=1",
                      "--failure_warmup_gap=0", "--failure_rollback",
                      "--failure_restarts=1", "--failure_keep=last", "--seed=5"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ("FAILED attempt 1 (seed 5) at epoch 2" in proc.stderr
            and "from the checkpoint of epoch 1" in proc.stderr), proc.stderr[-4000:]
    assert "starting at epoch 1 (attempt 2, seed 1000008)" in proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    (attempt,) = results["failed_attempts"]
    assert (attempt["epoch"], attempt["rollback_epoch"], attempt["seed"]) == (2, 1, 5)
    assert attempt["end_of_warmup"]
    assert results["seed"] == run_dir_lib.attempt_seed(5, 1)
    old = [json.loads(ln) for ln in (run_dir / "attempt_1" / "metrics.jsonl").read_text().splitlines()]
    new = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in old] == [1, 2] and [r["epoch"] for r in new] == [1, 2, 3]
    assert new[0] == old[0]  # epoch 1 is kept, not trained again
    assert new[1] != old[1]  # epoch 2 was trained again, with the new seed
    epoch_evals = 128 * 8 * 3
    assert attempt["grad_evals"] == epoch_evals  # only epoch 2 was discarded
    assert results["grad_evals"] == 4 * epoch_evals
    assert attempt["train_seconds"] == pytest.approx(old[1]["epoch_seconds"], rel=1e-6)
    assert results["train_seconds"] == pytest.approx(
        old[1]["epoch_seconds"] + sum(r["epoch_seconds"] for r in new), rel=1e-6)
    # The rollback checkpoint is the failed attempt's epoch-1 checkpoint.
    assert (run_dir / "attempt_1" / "backup" / "epoch-1.npz").exists()


@pytest.mark.skipif(bool(__import__("tensorflow").config.list_physical_devices("GPU")),
                    reason="CPU rule")
def test_run_records_the_measured_xla_choice(tmp_path, monkeypatch, mnist_dir):
    """train_lib.run times XLA against graph mode before it writes the
    manifest, where "auto" leaves the choice open (a BatchNorm model, BS),
    and trains in the mode chosen."""
    import keras

    from tf_backsmooth import train_lib, xla_plan

    def tiny_bn(config, info):
        return keras.Sequential([keras.Input(info.input_shape), keras.layers.Conv2D(4, 3, 2),
                                 keras.layers.BatchNormalization(), keras.layers.ReLU(),
                                 keras.layers.Flatten(), keras.layers.Dense(info.num_classes)])

    calls = []

    def fake_timed(fn, args, xla):
        calls.append((xla, int(args[0].shape[0])))
        fn(*args)
        return 0.01 if xla else 0.02

    monkeypatch.setattr(builders, "make_classifier", tiny_bn)
    monkeypatch.setattr(xla_plan, "timed", fake_timed)
    config = config_lib.TrainConfig(
        dataset="mnist", data_dir=str(mnist_dir), model="mlp", method="backward_smoothing",
        epsilon=0.1, epochs=1, batch_size=64, num_train_examples=128, eval_every=0,
        test_examples=64, test_pgd_steps=2, verbose=0, tensorboard=False,
        model_dir=str(tmp_path))
    train_lib.run(config)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["xla"]["used"] is True, manifest["xla"]
    assert "measured on a batch of 64: XLA 10 ms, graph 20 ms" in manifest["xla"]["reason"]
    assert calls == [(False, 64), (True, 64)] * 4  # measured once, before fit
