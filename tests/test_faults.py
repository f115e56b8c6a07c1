"""Faults never cost a run: atomic files, verified checkpoints with fallback,
write errors at every write point, the run-directory lock, NaN handling.

In-process runs of ``train_lib.run`` on a tiny configuration; the file layer
(``fileio``) is monkeypatched to fail. ``test_train.py`` has the bin/train
(subprocess) counterparts: tmpfs disk full, unwritable directories, kill -9.
"""

import errno
import json
import logging
import os

import numpy as np
import pytest
from conftest import shared_data_dir

from tf_backsmooth import config as config_lib
from tf_backsmooth import fileio, train_lib
from tf_backsmooth import run_dir as run_dir_lib

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ fileio
def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    sha = fileio.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sha == fileio.sha256_file(path)

    def half_then_fail(fd, data):  # a disk that fills up half-way
        os.write(fd, bytes(data[: len(data) // 2]))
        _enospc()

    monkeypatch.setattr(fileio, "_write_all", half_then_fail)
    with pytest.raises(OSError) as err:
        fileio.write_json(path, {"a": 2, "long": "x" * 1000})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert json.loads(path.read_text()) == {"a": 1}  # the previous complete file
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary left
    assert fileio.describe(err.value).startswith(f"{path}: No space left on device (free")


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    fileio.append_jsonl(path, {"epoch": 1})
    monkeypatch.setattr(os, "replace", lambda *a: _enospc())
    with pytest.raises(OSError):
        fileio.append_jsonl(path, {"epoch": 2})
    monkeypatch.undo()
    assert fileio.read_jsonl(path) == [{"epoch": 1}]
    fileio.append_jsonl(path, {"epoch": 2})
    assert fileio.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in (".results.json.tmp123", "sub/.epoch-1.npz.tmp9", "keep.tmp", ".hidden"):
        (tmp_path / name).write_text("x")
    fileio.remove_stale_temporaries(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        ".hidden", "keep.tmp"]


def test_weights_and_model_written_in_memory_load_with_keras(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    sha = fileio.save_weights(model, tmp_path / "w.weights.h5")
    assert sha == fileio.sha256_file(tmp_path / "w.weights.h5")
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.load_weights(tmp_path / "w.weights.h5")
    fileio.save_model(model, tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    for a, b, c in zip(model.get_weights(), other.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_check_writable(tmp_path):
    fileio.check_writable(tmp_path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError) as err:
        fileio.check_writable(tmp_path / "missing")
    assert err.value.filename == str(tmp_path / "missing")


def test_lock_refuses_a_second_holder_and_is_taken_over_after_release(tmp_path):
    first = fileio.RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(fileio.LockedError, match=f"PID {os.getpid()}"):
        fileio.RunLock(tmp_path).acquire()
    first.release()  # as when its process dies (the kernel drops the flock)
    second = fileio.RunLock(tmp_path)
    assert second.acquire() == f"PID {os.getpid()} on {os.uname().nodename}"
    second.release()


# ------------------------------------------------------- in-process runs
def _config(model_dir, **kw):
    path = shared_data_dir("mnist")
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not available")
    base = dict(dataset="mnist", data_dir=str(path), model="mlp",
                method="backward_smoothing", epsilon=0.1, epochs=2, batch_size=128,
                num_train_examples=256, optimizer="adam", lr=0.003,
                lr_schedule="constant", eval_examples=100, eval_pgd_steps=2,
                test_examples=100, test_pgd_steps=2, verbose=0, tensorboard=False,
                model_dir=str(model_dir))
    base.update(kw)
    return config_lib.TrainConfig(**base)


_COMPARED = ("clean_accuracy", "robust_accuracy", "steps", "grad_evals", "weights_sha256",
             "selected_weights")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and the files it wrote, in order."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    writes = []
    real = fileio.write_bytes

    def spy(path, data):
        writes.append(os.path.relpath(path, run_dir))
        return real(path, data)

    fileio.write_bytes = spy
    try:
        results = train_lib.run(_config(run_dir))
    finally:
        fileio.write_bytes = real
    return results, writes, run_dir


def _epochs(run_dir):
    return [r["epoch"] for r in fileio.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def _backup_epoch(run_dir):
    """The newest checkpoint on disk (files appear only complete: atomic)."""
    backup = os.path.join(run_dir, "backup")
    names = os.listdir(backup) if os.path.isdir(backup) else []
    return max([int(n[6:-4]) for n in names if n.startswith("epoch-")], default=0)


def _resume_and_compare(run_dir, reference_results, caplog, expect_epoch=None):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tf_backsmooth"):
        results = train_lib.run(_config(run_dir))
    for key in _COMPARED:
        assert results[key] == reference_results[key], key
    assert _epochs(run_dir) == [1, 2]  # every epoch once, none twice
    assert not os.path.exists(os.path.join(run_dir, "backup"))
    if expect_epoch is not None:  # no completed epoch is trained again
        assert f"starting at epoch {expect_epoch}" in caplog.text
    return caplog.text


def test_reference_writes_every_file_through_fileio(reference):
    _, writes, run_dir = reference
    assert writes[:2] == ["config.json", "manifest.json"]
    assert writes[-2:] == ["model.keras", "results.json"]
    for epoch in (1, 2):
        for name in ("best.weights.h5", "best.json", "metrics.jsonl",
                     f"backup/epoch-{epoch}.npz", "backup/training_metadata.json"):
            assert (name in writes), name
    assert sorted(os.listdir(run_dir)) == [
        "best.json", "best.weights.h5", "config.json", "manifest.json", "metrics.jsonl",
        "model.keras", "results.json", "run.lock"]


def test_a_write_failing_at_every_write_point_resumes_to_the_same_results(
        reference, tmp_path, monkeypatch, caplog):
    """The Nth write (N = 1 .. every write of the run, the run-directory
    probe first) writes half of its bytes and fails with ENOSPC; the run
    stops with that OSError, and the same call afterwards finishes with the
    uninterrupted run's results, resuming at the last completed epoch."""
    ref_results, writes, _ = reference
    real = fileio._write_all
    for n in range(1, len(writes) + 2):  # + the probe
        run_dir = tmp_path / f"fail_{n}"
        calls = []

        def flaky(fd, data):
            calls.append(1)
            if len(calls) == n:
                os.write(fd, bytes(data[: len(data) // 2]))
                _enospc()
            return real(fd, data)

        monkeypatch.setattr(fileio, "_write_all", flaky)
        with pytest.raises((OSError, run_dir_lib.RunError)) as err:
            train_lib.run(_config(run_dir))
        monkeypatch.setattr(fileio, "_write_all", real)
        assert "No space left on device" in str(err.value), n
        assert not [p for p in run_dir.rglob(".*tmp*")], n  # no temporaries left
        done = _backup_epoch(run_dir)
        _resume_and_compare(run_dir, ref_results, caplog, expect_epoch=done)


def test_damaged_checkpoints_fall_back_or_stop_with_one_line(reference, tmp_path,
                                                             monkeypatch, caplog):
    """Killed while writing model.keras (so both checkpoints are on disk):
    a truncated newest checkpoint falls back to the older one (and trains
    epoch 2 again), a damaged metadata file falls back to the files' own
    CRCs, and with every checkpoint damaged the run stops with one line."""
    ref_results, _, _ = reference

    def killed_in_final_save(run_dir):
        _run_failing_at_model_keras(run_dir, monkeypatch)
        backup = run_dir / "backup"
        assert sorted(os.listdir(backup)) == ["epoch-1.npz", "epoch-2.npz",
                                              "training_metadata.json"]
        return backup

    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    # Newest checkpoint truncated: epoch 1's is used, epoch 2 is trained again.
    backup = killed_in_final_save(tmp_path / "a")
    truncate(backup / "epoch-2.npz")
    text = _resume_and_compare(tmp_path / "a", ref_results, caplog, expect_epoch=1)
    assert "cannot use epoch-2.npz (sha256 differs" in text
    assert "resumed from" in text and "epoch-1.npz (after epoch 1)" in text

    # Metadata truncated: the checkpoints' own zip CRCs are checked instead,
    # and the run goes straight to the final evaluation.
    backup = killed_in_final_save(tmp_path / "b")
    truncate(backup / "training_metadata.json")
    text = _resume_and_compare(tmp_path / "b", ref_results, caplog, expect_epoch=2)
    assert "training_metadata.json is unreadable" in text

    # Every checkpoint damaged: one line naming the files and what to do.
    backup = killed_in_final_save(tmp_path / "c")
    truncate(backup / "epoch-2.npz")
    raw = bytearray((backup / "epoch-1.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: same size, wrong content
    (backup / "epoch-1.npz").write_bytes(bytes(raw))
    with pytest.raises(run_dir_lib.RunError) as err:
        train_lib.run(_config(tmp_path / "c"))
    message = str(err.value)
    assert "\n" not in message and "epoch-2.npz" in message and "epoch-1.npz" in message
    assert "delete that folder" in message
    (backup / "training_metadata.json").unlink()  # no checksums: the CRC catches it
    with pytest.raises(run_dir_lib.RunError, match="epoch-1.npz"):
        train_lib.run(_config(tmp_path / "c"))


def _run_failing_at_model_keras(run_dir, monkeypatch):
    """A run whose write of model.keras fails (disk full): both checkpoints stay."""
    real = fileio.write_bytes

    def fail_on_model(path, data):
        if str(path).endswith("model.keras"):
            _enospc()
        return real(path, data)

    monkeypatch.setattr(fileio, "write_bytes", fail_on_model)
    with pytest.raises(OSError):
        train_lib.run(_config(run_dir))
    monkeypatch.setattr(fileio, "write_bytes", real)


def test_a_damaged_best_checkpoint_is_not_used(reference, tmp_path, monkeypatch, caplog):
    _run_failing_at_model_keras(tmp_path, monkeypatch)
    data = (tmp_path / "best.weights.h5").read_bytes()
    (tmp_path / "best.weights.h5").write_bytes(data[:-100])
    with caplog.at_level(logging.WARNING, logger="tf_backsmooth"):
        results = train_lib.run(_config(tmp_path))
    assert "does not match the checksum" in caplog.text
    assert results["selected_weights"] == "last"


def _poison_at(monkeypatch, poisoned_epoch):
    """Sets a weight to NaN at the start of 0-based epoch ``poisoned_epoch``."""
    import keras

    class Poison(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == poisoned_epoch:
                var = self.model.base_model.trainable_variables[-1]  # logits bias
                var.assign(np.full(var.shape, np.nan, np.float32))

    original = train_lib.make_callbacks

    def with_poison(*args, **kwargs):
        hooks = original(*args, **kwargs)
        hooks.all.insert(0, Poison())
        return hooks

    monkeypatch.setattr(train_lib, "make_callbacks", with_poison)


def test_nan_before_any_epoch_exports_nothing(tmp_path, monkeypatch):
    _poison_at(monkeypatch, 0)
    with pytest.raises(run_dir_lib.RunError, match="before any epoch completed") as err:
        train_lib.run(_config(tmp_path))
    assert "nothing exported" in str(err.value)
    assert not (tmp_path / "model.keras").exists() and not (tmp_path / "results.json").exists()
    assert not (tmp_path / "best.weights.h5").exists()  # the NaN epoch was not "best"


def test_nan_later_exports_the_last_good_weights_and_says_so(tmp_path, monkeypatch):
    """Epoch 1 trains; the loss becomes NaN in epoch 2: the exported model
    holds epoch 1's weights, and the warning is in results.json (bin/train
    prints every warning on the console)."""
    import keras

    _poison_at(monkeypatch, 1)
    results = train_lib.run(_config(tmp_path))
    assert results["nan_stop"] and results["selected_weights"] == "best (epoch 1, after NaN)"
    assert any("NaN" in w and "best (epoch 1, after NaN)" in w for w in results["warnings"])
    classifier = keras.models.load_model(tmp_path / "model.keras")
    assert all(np.isfinite(w).all() for w in classifier.get_weights())
    # Without validation there is no best checkpoint: the backup's last good epoch.
    results = train_lib.run(_config(tmp_path / "noval", eval_every=0))
    assert results["selected_weights"] == "last good epoch 1 (after NaN)"


def _fail_writes_of(monkeypatch, suffix):
    real = fileio.write_bytes

    def fail(path, data):
        if str(path).endswith(suffix):
            _enospc()
        return real(path, data)

    monkeypatch.setattr(fileio, "write_bytes", fail)


def test_resume_is_exact_with_dropout(tmp_path, monkeypatch):
    """small_cnn has Dropout. Its RNG state (which ``save_weights`` leaves
    out) is in the checkpoint, so a run stopped after epoch 1 and resumed
    ends with weights bit-identical to an uninterrupted run's."""
    full = train_lib.run(_config(tmp_path / "full", model="small_cnn", epochs=3))
    _fail_writes_of(monkeypatch, "epoch-2.npz")
    with pytest.raises(OSError):
        train_lib.run(_config(tmp_path / "cut", model="small_cnn", epochs=3))
    monkeypatch.undo()
    resumed = train_lib.run(_config(tmp_path / "cut", model="small_cnn", epochs=3))
    for key in _COMPARED:
        assert resumed[key] == full[key], key


def test_oserror_recovered_from_a_tensorflow_message():
    # The message of the tf.errors.ResourceExhaustedError a TensorBoard
    # writer raised on a full tmpfs here.
    text = ("{{function_node __wrapped__WriteSummary_device_/job:localhost/replica:0/task:0/"
            "device:CPU:0}} /tmp/tfs/tb/events.out.tfevents.1796195932.vm.12168.0.v2; "
            "No space left on device\n\tFailed to flush 11 events")
    err = fileio.oserror_from_text(text)
    assert err.errno == errno.ENOSPC
    assert err.filename == "/tmp/tfs/tb/events.out.tfevents.1796195932.vm.12168.0.v2"
    assert fileio.oserror_from_text("Incompatible shapes: [3] vs [4]") is None


@pytest.mark.parametrize("code,hint", [
    (errno.ENOSPC, "free some space"), (errno.EIO, "I/O error"),
    (errno.EROFS, "read-only"), (errno.EACCES, "permissions")])
def test_write_errors_are_described_in_one_line(code, hint):
    line = fileio.describe(OSError(code, os.strerror(code), "/runs/x/backup/epoch-2.npz"))
    assert line.startswith(f"/runs/x/backup/epoch-2.npz: {os.strerror(code)} (")
    assert hint in line and "\n" not in line
