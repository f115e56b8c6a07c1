"""Tests of tf_backsmooth.data: offline files, tfds (mocked), carve, pipeline."""

import dataclasses
import gzip
import hashlib
import pickle
import shutil
import socket
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tf_backsmooth import data
from tf_backsmooth.data import DataError

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def shared_mnist_dir() -> Path:
    """The canonical MNIST IDX files kept in ``<repo>/../shared/data/mnist``."""
    path = (REPO.parent / "shared" / "data" / "mnist").resolve()
    if not (path / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found in {path} (expected <repo>/../shared/data/mnist)")
    return path


def fashion_dir() -> Path:
    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"{FASHION_DIR} missing (Debian package dataset-fashion-mnist)")
    return FASHION_DIR


def _hashes(x):
    return sorted(hashlib.sha1(row.tobytes()).hexdigest() for row in x)


# ---------------------------------------------------------------------------
# Writers of tiny synthetic files in the canonical formats
# ---------------------------------------------------------------------------


def write_idx(path, array, magic=None, compress=None):
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else 0x800 | array.ndim
    raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    compress = str(path).endswith(".gz") if compress is None else compress
    Path(path).write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(folder, n_train=20, n_test=10, suffix=".gz", seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        arrays[prefix] = (x[..., None], y.astype(np.int64))
    return arrays


def _cifar_batch(x, labels, label_key):
    # Canonical layout: uint8 rows of 3072 = R plane, G plane, B plane.
    return {b"batch_label": b"synthetic", label_key: list(map(int, labels)),
            b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),
            b"filenames": [b"img%d.png" % i for i in range(len(x))]}


def write_cifar10(folder, per_batch=8, n_test=6, seed=0):
    """``folder/cifar-10-batches-py`` with 5 train batches and a test batch."""
    rng = np.random.default_rng(seed)
    batches_dir = folder / "cifar-10-batches-py"
    batches_dir.mkdir(parents=True)
    xs, ys = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        with open(batches_dir / name, "wb") as f:
            pickle.dump(_cifar_batch(x, y, b"labels"), f, protocol=2)
        xs.append(x)
        ys.append(y)
    train = (np.concatenate(xs[:5]), np.concatenate(ys[:5]))
    return batches_dir, train, (xs[5], ys[5])


def _patterned_images(n, seed):
    """Images with no symmetries, so a crop offset and flip are identifiable."""
    return np.random.default_rng(seed).integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# Dataset registry
# ---------------------------------------------------------------------------


def test_info_and_unknown_names():
    info = data.get_info("cifar100")
    assert (info.num_classes, info.input_shape, info.train_size) == (100, (32, 32, 3), 50000)
    assert data.get_info("svhn_cropped").augment and not data.get_info("svhn_cropped").hflip
    assert data.get_info("cifar10").hflip and not data.get_info("mnist").augment
    assert set(data.DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped"}
    for info in data.DATASETS.values():
        channels = info.input_shape[-1]
        assert len(info.mean) == len(info.std) == channels
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3
    for call in (lambda: data.get_info("imagenet"),
                 lambda: data.load_arrays("imagenet", "train"),
                 lambda: data.make_dataset("imagenet", "train", 8)):
        with pytest.raises(DataError) as err:
            call()
        for name in data.DATASETS:
            assert name in str(err.value)


# ---------------------------------------------------------------------------
# Real offline files
# ---------------------------------------------------------------------------


def _check_stats(info, x):
    pixels = x.astype(np.float64) / 255.0
    assert abs(pixels.mean() - info.mean[0]) < 1e-3
    assert abs(pixels.std() - info.std[0]) < 1e-3


def test_fashion_mnist_from_debian_default_location():
    folder = fashion_dir()
    found = data.find_offline_files("fashion_mnist")
    assert found["test"] == [str(folder / "t10k-images-idx3-ubyte.gz"),
                             str(folder / "t10k-labels-idx1-ubyte.gz")]
    x, y = data.load_arrays("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9 and np.bincount(y).tolist() == [1000] * 10
    assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    x, y = data.load_arrays("fashion_mnist", "train", validation_size=0)
    assert x.shape == (60000, 28, 28, 1)
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    _check_stats(data.get_info("fashion_mnist"), x)


def test_mnist_from_shared_folder():
    folder = shared_mnist_dir()
    x, y = data.load_arrays("mnist", "test", data_dir=folder)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    assert int(y.sum()) == 44434
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    x, y = data.load_arrays("mnist", "train", data_dir=folder, validation_size=0)
    assert x.shape == (60000, 28, 28, 1) and y[:5].tolist() == [5, 0, 4, 1, 9]
    _check_stats(data.get_info("mnist"), x)


def test_train_validation_carve():
    folder = shared_mnist_dir()
    full_x, full_y = data.load_arrays("mnist", "train", data_dir=folder, validation_size=0)
    tx, ty = data.load_arrays("mnist", "train", data_dir=folder, validation_size=1000, seed=3)
    vx, vy = data.load_arrays("mnist", "validation", data_dir=folder, validation_size=1000, seed=3)
    assert len(tx) == 59000 and len(vx) == 1000
    # A partition of the official training set: every example used once.
    assert _hashes(np.concatenate([tx, vx])) == _hashes(full_x)
    # The documented carve: first indices of default_rng(seed).permutation, sorted.
    held_out = np.sort(np.random.default_rng(3).permutation(60000)[:1000])
    np.testing.assert_array_equal(vy, full_y[held_out])
    np.testing.assert_array_equal(vx, full_x[held_out])
    # Deterministic by seed, different for another seed.
    vx2, _ = data.load_arrays("mnist", "validation", data_dir=folder, validation_size=1000, seed=3)
    np.testing.assert_array_equal(vx, vx2)
    vx4, _ = data.load_arrays("mnist", "validation", data_dir=folder, validation_size=1000, seed=4)
    assert not np.array_equal(vx, vx4)
    # Default validation size; num_examples takes a prefix of the carved split.
    dx, _ = data.load_arrays("mnist", "validation", data_dir=folder)
    assert len(dx) == data.get_info("mnist").validation_size
    nx, ny = data.load_arrays("mnist", "train", data_dir=folder, validation_size=1000,
                              seed=3, num_examples=50)
    np.testing.assert_array_equal(nx, tx[:50])
    np.testing.assert_array_equal(ny, ty[:50])
    # Bad arguments.
    with pytest.raises(DataError, match="validation_size=0"):
        data.load_arrays("mnist", "validation", data_dir=folder, validation_size=0)
    with pytest.raises(DataError, match="leaves no training examples"):
        data.load_arrays("mnist", "train", data_dir=folder, validation_size=60000)
    with pytest.raises(DataError, match="has only 10000"):
        data.load_arrays("mnist", "test", data_dir=folder, num_examples=10001)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="num_examples"):
            data.load_arrays("mnist", "test", data_dir=folder, num_examples=bad)
    with pytest.raises(DataError, match="valid splits"):
        data.load_arrays("mnist", "val", data_dir=folder)


# ---------------------------------------------------------------------------
# Synthetic offline files: formats and layouts
# ---------------------------------------------------------------------------


def test_uncompressed_idx_in_subfolder(tmp_path):
    arrays = write_mnist(tmp_path / "fashion-mnist", suffix="")
    found = data.find_offline_files("fashion_mnist", tmp_path)
    assert found["train"][0] == str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte")
    x, y = data.load_arrays("fashion_mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x, arrays["t10k"][0])
    np.testing.assert_array_equal(y, arrays["t10k"][1])
    assert data.find_offline_files("mnist", tmp_path) is None  # no cross-talk


def test_cifar10_pickles_and_archive(tmp_path):
    batches_dir, (train_x, train_y), (test_x, test_y) = write_cifar10(tmp_path / "plain")
    x, y = data.load_arrays("cifar10", "train", data_dir=tmp_path / "plain", validation_size=0)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, train_x)  # NCHW rows -> NHWC images
    np.testing.assert_array_equal(y, train_y)
    # data_dir pointing into the batches folder itself works too.
    x, y = data.load_arrays("cifar10", "test", data_dir=batches_dir)
    np.testing.assert_array_equal(x, test_x)

    (tmp_path / "archived").mkdir()
    with tarfile.open(tmp_path / "archived" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    found = data.find_offline_files("cifar10", tmp_path / "archived")
    assert "cifar-10-python.tar.gz" in found["test"][0]
    x, y = data.load_arrays("cifar10", "test", data_dir=tmp_path / "archived")
    np.testing.assert_array_equal(x, test_x)
    np.testing.assert_array_equal(y, test_y)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        batch = _cifar_batch(x, rng.integers(0, 100, n), b"fine_labels")
        batch[b"coarse_labels"] = [0] * n
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    x, y = data.load_arrays("cifar100", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x, batch[b"data"].reshape(5, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, batch[b"fine_labels"])


class _Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/definitely/not/here",))


def test_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load shutil.rmtree") as err:
        data.load_arrays("cifar100", "test", data_dir=tmp_path)
    assert str(folder / "test") in str(err.value)


def test_svhn_mat_maps_label_10_to_0(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    y = np.array([10, 1, 2, 3, 10, 9, 5])
    (tmp_path / "svhn").mkdir()
    for split in ("train", "test"):
        scipy_io.savemat(tmp_path / "svhn" / f"{split}_32x32.mat",
                         {"X": x.transpose(1, 2, 3, 0), "y": y[:, None]})
    lx, ly = data.load_arrays("svhn_cropped", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(lx, x)
    assert ly.tolist() == [0, 1, 2, 3, 0, 9, 5]


# ---------------------------------------------------------------------------
# Corrupt, incomplete and missing data
# ---------------------------------------------------------------------------


def test_truncated_real_file_names_the_file(tmp_path):
    source = fashion_dir() if FASHION_DIR.is_dir() else shared_mnist_dir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(source / name, tmp_path / name)
    broken = tmp_path / "t10k-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        data.load_arrays("fashion_mnist", "test", data_dir=tmp_path)
    assert str(broken) in str(err.value)


@pytest.mark.parametrize("problem,match", [
    ("magic", "bad IDX magic number 2051"),
    ("short", "implies 18; the file is truncated"),
    ("count", "10 images but 9 labels"),
    ("range", r"labels must be in \[0, 10\)"),
])
def test_corrupt_idx_files(tmp_path, problem, match):
    write_mnist(tmp_path, n_train=4, n_test=10, suffix="")
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    if problem == "magic":
        write_idx(labels, np.zeros(10), magic=2051)
    elif problem == "short":
        labels.write_bytes(labels.read_bytes()[:-1])
    elif problem == "count":
        write_idx(labels, np.zeros(9))
    else:
        write_idx(labels, np.full(10, 10))
    with pytest.raises(DataError, match=match) as err:
        data.load_arrays("mnist", "test", data_dir=tmp_path)
    assert str(labels) in str(err.value)


def test_incomplete_folder(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match="Incomplete mnist test files") as err:
        data.load_arrays("mnist", "test", data_dir=tmp_path)
    assert str(tmp_path) in str(err.value) and "t10k-labels-idx1-ubyte" in str(err.value)


def _write_keras_npz(path, seed=0):
    """A small ``mnist.npz`` in the layout ``keras.datasets.mnist`` downloads."""
    rng = np.random.default_rng(seed)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
              for s, n in (("train", 12), ("test", 6))}
    arrays.update({f"y_{s}": rng.integers(0, 10, n, dtype=np.uint8)
                   for s, n in (("train", 12), ("test", 6))})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def test_mnist_from_keras_download(tmp_path, monkeypatch):
    """``~/.keras/datasets/mnist.npz`` (KERAS_HOME here) is read without a
    data_dir, and ``data_dir/mnist.npz`` with one; both splits, exact."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    data.clear_cache()
    arrays = _write_keras_npz(tmp_path / "keras" / "datasets" / "mnist.npz")
    x, y = data.load_arrays("mnist", "test")
    np.testing.assert_array_equal(x[..., 0], arrays["x_test"])
    np.testing.assert_array_equal(y, arrays["y_test"])
    x, y = data.load_arrays("mnist", "train", validation_size=0)
    np.testing.assert_array_equal(x[..., 0], arrays["x_train"])
    assert data.find_offline_files("mnist")["test"] == [
        f"{tmp_path / 'keras' / 'datasets' / 'mnist.npz'} (x_test, y_test)"]
    other = _write_keras_npz(tmp_path / "elsewhere" / "mnist.npz", seed=1)
    x, _ = data.load_arrays("mnist", "test", data_dir=tmp_path / "elsewhere")
    np.testing.assert_array_equal(x[..., 0], other["x_test"])
    # Fashion-MNIST is not taken from MNIST's file.
    assert data.find_offline_files("fashion_mnist", data_dir=tmp_path / "elsewhere") is None


def test_broken_keras_download_names_the_file(tmp_path):
    arrays = _write_keras_npz(tmp_path / "x.npz")
    del arrays["y_test"]
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(DataError, match=r"mnist.npz has no array y_test; Keras"):
        data.load_arrays("mnist", "test", data_dir=tmp_path)
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 not a zip")
    data.clear_cache()
    with pytest.raises(DataError, match=r"Cannot read .*mnist.npz.*fresh keras.datasets"):
        data.load_arrays("mnist", "test", data_dir=tmp_path)


def test_missing_data_names_the_keras_download(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_arrays("mnist", "test", data_dir=tmp_path / "none")
    assert f"keras.datasets.mnist.load_data()) at:\n  {tmp_path / 'none' / 'mnist.npz'}" in str(err.value)


def test_missing_data_fails_fast_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the data loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    missing = tmp_path / "does-not-exist"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        data.load_arrays("mnist", "train", data_dir=missing)
    assert time.monotonic() - start < 10
    message = str(err.value)
    for where in (missing / "mnist", missing):
        assert f"  {where}\n" in message
    assert "train-images-idx3-ubyte.gz" in message and "tensorflow-datasets" in message
    assert str(missing / "mnist") + "/" in message  # the tfds data_dir


# ---------------------------------------------------------------------------
# tensorflow-datasets path (mocked: no download possible here)
# ---------------------------------------------------------------------------


def test_tfds_path_mnist(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    data.clear_cache()
    assert data.find_offline_files("mnist", tmp_path) is None  # forces the tfds path
    with tfds.testing.mock_data(num_examples=30):
        full_x, full_y = data.load_arrays("mnist", "train", data_dir=tmp_path, validation_size=0)
        tx, ty = data.load_arrays("mnist", "train", data_dir=tmp_path, validation_size=8)
        vx, vy = data.load_arrays("mnist", "validation", data_dir=tmp_path, validation_size=8)
        ds = data.make_dataset("mnist", "test", 8, data_dir=tmp_path)
        batches = list(ds.as_numpy_iterator())
    data.clear_cache()
    assert full_x.shape == (30, 28, 28, 1) and full_x.dtype == np.uint8
    assert full_y.dtype == np.int64 and 0 <= full_y.min() and full_y.max() < 10
    assert len(tx) == 22 and len(vx) == 8
    assert _hashes(np.concatenate([tx, vx])) == _hashes(full_x)
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    x, y = batches[0]
    assert x.shape == (8, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5


def test_tfds_path_cifar10(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    data.clear_cache()
    with tfds.testing.mock_data(num_examples=12):
        ds = data.make_dataset("cifar10", "train", 5, data_dir=tmp_path, validation_size=2)
        batches = list(ds.as_numpy_iterator())
    data.clear_cache()
    assert [x.shape for x, _ in batches] == [(5, 32, 32, 3), (5, 32, 32, 3)]
    for x, y in batches:
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int32 and 0 <= y.min() and y.max() < 10


# ---------------------------------------------------------------------------
# tf.data pipeline
# ---------------------------------------------------------------------------


def _epoch(ds):
    return [(x, y) for x, y in ds.as_numpy_iterator()]


def test_make_dataset_batches_dtypes_and_order():
    folder = shared_mnist_dir()
    x, y = data.load_arrays("mnist", "test", data_dir=folder, num_examples=100)
    ds = data.make_dataset("mnist", "test", 32, data_dir=folder, num_examples=100)
    batches = _epoch(ds)
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    bx, by = batches[0]
    assert bx.shape == (32, 28, 28, 1) and bx.dtype == np.float32 and by.dtype == np.int32
    # Test split: no shuffle, no augmentation by default; pixels scaled to [0, 1].
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]), x / 255.0, atol=1e-7)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    dropped = data.make_dataset("mnist", "test", 32, data_dir=folder, num_examples=100,
                                drop_remainder=True)
    assert [len(b[1]) for b in _epoch(dropped)] == [32, 32, 32]
    assert dropped.element_spec[0].shape.as_list() == [32, 28, 28, 1]
    repeated = data.make_dataset("mnist", "test", 32, data_dir=folder, num_examples=100,
                                 repeat=True)
    # Batches never span two epochs: the smaller last batch ends each one.
    assert [len(b[1]) for b in repeated.take(9).as_numpy_iterator()] == [32, 32, 32, 4] * 2 + [32]
    two = data.make_dataset("mnist", "test", 32, data_dir=folder, num_examples=100, epochs=2)
    assert [len(b[1]) for b in _epoch(two)] == [32, 32, 32, 4] * 2
    for bad in (0, -4, 3.0):
        with pytest.raises(DataError, match="batch_size"):
            data.make_dataset("mnist", "test", bad, data_dir=folder)
    for kwargs, match in ((dict(epochs=2, repeat=True), "not both"),
                          (dict(first_epoch=-1), "first_epoch"),
                          (dict(first_epoch=3, epochs=2), "epochs must be an integer >= 3"),
                          (dict(epochs=1.5), "epochs"),
                          (dict(seed=-1), "seed"), (dict(seed=2**31), "seed")):
        with pytest.raises(DataError, match=match):
            data.make_dataset("mnist", "test", 32, data_dir=folder, **kwargs)
    with pytest.raises(DataError, match="drops every batch"):
        data.make_dataset("mnist", "test", 128, data_dir=folder, num_examples=100,
                          drop_remainder=True)


def test_pipelines_run_without_tf_data_autotuning():
    # With autotuning on, deleting an iterator (every fit's end) waits for the
    # autotune thread's exponentially backed-off wake-up (BUILD_NOTES.md).
    from tf_backsmooth import train_lib

    folder = shared_mnist_dir()
    ds = data.make_dataset("mnist", "train", 32, data_dir=folder, num_examples=64, augment=True)
    x, y = data.load_arrays("mnist", "test", data_dir=folder, num_examples=64)
    train_ds, steps = train_lib.train_dataset(x, y, data.get_info("mnist"), 32, seed=0,
                                              first_epoch=0, epochs=2, augment=False)
    for pipeline in (ds, train_ds):
        assert pipeline.options().autotune.enabled is False
    assert steps == 2 and len(list(train_ds.as_numpy_iterator())) == 4
    assert len(list(ds.as_numpy_iterator())) == 2


def test_make_dataset_shuffling_is_keyed_on_seed_and_epoch():
    folder = shared_mnist_dir()
    kwargs = dict(data_dir=folder, num_examples=64, validation_size=1000)
    _, y = data.load_arrays("mnist", "train", **kwargs)

    def labels(ds):
        return np.concatenate([b[1] for b in ds.as_numpy_iterator()])

    ds = data.make_dataset("mnist", "train", 16, seed=1, epochs=2, **kwargs)  # shuffled by default
    epoch0, epoch1 = labels(ds).reshape(2, 64)
    assert sorted(epoch0) == sorted(y) == sorted(epoch1) and not np.array_equal(epoch0, y)
    assert not np.array_equal(epoch0, epoch1)  # a new order every epoch
    np.testing.assert_array_equal(labels(ds), np.concatenate([epoch0, epoch1]))  # replayed
    # epochs=None: one epoch per iteration, the next epoch each time (as fit iterates it).
    one = data.make_dataset("mnist", "train", 16, seed=1, **kwargs)
    np.testing.assert_array_equal(labels(one), epoch0)
    np.testing.assert_array_equal(labels(one), epoch1)
    later = data.make_dataset("mnist", "train", 16, seed=1, first_epoch=1, **kwargs)
    np.testing.assert_array_equal(labels(later), epoch1)
    # ... with the augmentation of the same global steps as the epochs=2 pipeline.
    def images(ds):
        return np.concatenate([b[0] for b in ds.as_numpy_iterator()])

    both = images(data.make_dataset("mnist", "train", 16, seed=1, epochs=2, augment=True, **kwargs))
    each = data.make_dataset("mnist", "train", 16, seed=1, augment=True, **kwargs)
    np.testing.assert_array_equal(np.concatenate([images(each), images(each)]), both)
    # Keyed on the epoch number: a run resumed at epoch 1 sees what it would have seen.
    resumed = data.make_dataset("mnist", "train", 16, seed=1, first_epoch=1, epochs=2, **kwargs)
    np.testing.assert_array_equal(labels(resumed), epoch1)
    stream = data.make_dataset("mnist", "train", 16, seed=1, repeat=True, **kwargs)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in stream.take(8)]),
                                  np.concatenate([epoch0, epoch1]))
    other = data.make_dataset("mnist", "train", 16, seed=2, **kwargs)
    assert not np.array_equal(labels(other), epoch0)
    unshuffled = data.make_dataset("mnist", "train", 16, shuffle=False, **kwargs)
    np.testing.assert_array_equal(labels(unshuffled), y)


def _pipeline_before_issue_14(x, y, info, batch_size, seed, first_epoch, epochs, augment):
    """``train_lib.train_dataset`` as bin/train used it before 736e084 moved
    the pipeline into ``data.make_dataset``, verbatim: bin/train's batches must
    stay bit-identical to it (the quickstart's numbers, resumes of older runs)."""
    import tensorflow as tf

    from tf_backsmooth import rng

    n = len(y)
    steps = n // batch_size
    images = tf.constant(x)
    labels = tf.constant(y.astype(np.int32))

    def epoch_indices(epoch):
        order = tf.argsort(rng.uniform([n], rng.fold_in(seed, epoch)))
        return tf.data.Dataset.from_tensor_slices(
            order[: steps * batch_size]).batch(batch_size)

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch_indices)
    ds = ds.enumerate(start=first_epoch * steps)

    def load(step, index):
        batch = tf.gather(images, index)
        if augment:
            batch = data.augment_batch(
                batch, rng.fold_in(rng.fold_in(seed, rng.AUGMENT), step),
                data.CROP_PADDING, info.hflip)
        return tf.cast(batch, tf.float32) / 255.0, tf.gather(labels, index)

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def test_bin_train_batches_are_make_dataset_batches(tmp_path):
    """bin/train's pipeline (``train_lib.run`` -> ``train_lib.train_batches``)
    is ``make_dataset(split="train")``: same batches for the same seed, equal
    to the pipeline of before 736e084, and resumable from any epoch."""
    from tf_backsmooth import config as config_lib
    from tf_backsmooth import train_lib

    _write_augmentation_data(tmp_path, "cifar10")  # 48 images; crop + flip by default
    # 40 training images after the carve, the first 35 kept: 4 batches of 8 per
    # epoch and 3 images dropped (different ones every epoch).
    config = config_lib.TrainConfig(dataset="cifar10", data_dir=str(tmp_path), validation_size=8,
                                    num_train_examples=35, batch_size=8, epochs=3, seed=5,
                                    model_dir=str(tmp_path / "run"))

    def batches(ds):
        return list(ds.as_numpy_iterator())

    ours = batches(train_lib.train_batches(config, first_epoch=0))
    users = batches(data.make_dataset("cifar10", "train", 8, data_dir=tmp_path, seed=5,
                                      validation_size=8, num_examples=35, epochs=3))
    info, train, _, _ = train_lib.load_data(config)
    before = batches(_pipeline_before_issue_14(train[0], train[1], info, 8, 5, 0, 3, True))
    wrapper, steps = train_lib.train_dataset(train[0], train[1], info, 8, 5, 0, 3, True)
    assert steps == 4 and len(ours) == len(users) == len(before) == 12
    for other in (users, before, batches(wrapper)):
        for (x1, y1), (x2, y2) in zip(ours, other, strict=True):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
    assert ours[0][0].shape == (8, 32, 32, 3) and ours[0][0].dtype == np.float32
    assert not np.array_equal(ours[0][0], ours[4][0])  # augmented, reordered every epoch
    resumed = batches(train_lib.train_batches(config, first_epoch=2))
    assert len(resumed) == 4
    for (x1, y1), (x2, y2) in zip(ours[8:], resumed, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert batches(train_lib.train_batches(config, first_epoch=3)) == []  # all epochs done


def _crop_of(aug, image, padding=4):
    """``(dy, dx, flipped)`` such that ``aug`` is that crop of ``image``, or None."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    size = image.shape[0]
    for flipped in (False, True):
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                window = padded[dy:dy + size, dx:dx + size]
                if np.array_equal(aug, window[:, ::-1] if flipped else window):
                    return dy, dx, flipped
    return None


def _write_augmentation_data(tmp_path, name):
    images = _patterned_images(48, seed=5)
    labels = np.arange(48) % 10
    if name == "cifar10":
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        parts = np.array_split(np.arange(48), 5) + [np.arange(48)]
        for file, part in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], parts,
                              strict=True):
            with open(folder / file, "wb") as f:
                pickle.dump(_cifar_batch(images[part], labels[part], b"labels"), f, protocol=2)
    else:
        scipy_io = pytest.importorskip("scipy.io")
        for split in ("train", "test"):
            scipy_io.savemat(tmp_path / f"{split}_32x32.mat",
                             {"X": images.transpose(1, 2, 3, 0), "y": labels[:, None]})
    return images


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_augmentation_is_a_padded_crop_and_flip(tmp_path, name):
    images = _write_augmentation_data(tmp_path, name)
    kwargs = dict(data_dir=tmp_path, validation_size=0, shuffle=False, seed=7)
    ds = data.make_dataset(name, "train", 16, epochs=2, **kwargs)  # augmented by default
    epoch1, epoch2 = np.split(np.concatenate([b[0] for b in ds.as_numpy_iterator()]), 2)
    assert epoch1.shape == images.shape and epoch1.dtype == np.float32
    assert 0.0 <= epoch1.min() and epoch1.max() <= 1.0
    assert (epoch1 == 0).any()  # zero padding shows up
    plain = data.make_dataset(name, "train", 16, augment=False, **kwargs)
    np.testing.assert_array_equal(
        np.concatenate([b[0] for b in plain.as_numpy_iterator()]), images / np.float32(255.0)
    )
    as_uint8 = np.round(epoch1 * 255).astype(np.uint8)
    crops = [_crop_of(a, im) for a, im in zip(as_uint8, images, strict=True)]
    assert all(crops), "an augmented image is not a padded crop of its source"
    assert len({c[:2] for c in crops}) > 5  # varied offsets
    flips = {c[2] for c in crops}
    assert flips == ({False, True} if name == "cifar10" else {False})
    assert not np.array_equal(epoch1, epoch2)  # new augmentation every epoch
    again = data.make_dataset(name, "train", 16, **kwargs)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in again.as_numpy_iterator()]),
                                  epoch1)
    # Evaluation splits are not augmented by default.
    test = data.make_dataset(name, "test", 16, data_dir=tmp_path)
    np.testing.assert_array_equal(
        np.concatenate([b[0] for b in test.as_numpy_iterator()]), images / np.float32(255.0)
    )


def test_augment_batch_is_a_function_of_the_seed():
    import tensorflow as tf

    images = tf.constant(_patterned_images(6, seed=9))
    seed = tf.constant([3, 4], tf.int32)
    out = data.augment_batch(images, seed, padding=2, flip=False)
    assert out.dtype == tf.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, data.augment_batch(images, seed, padding=2, flip=False))
    other = data.augment_batch(images, tf.constant([3, 5], tf.int32), padding=2, flip=False)
    assert not np.array_equal(out, other)
    for aug, image in zip(out.numpy(), images.numpy(), strict=True):
        crop = _crop_of(aug, image, padding=2)
        assert crop is not None and not crop[2]
