"""Image-classification datasets as NumPy arrays and ``tf.data`` pipelines.

Supported datasets: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` and
``svhn_cropped`` (see :data:`DATASETS`).

Where the data comes from
-------------------------
Every dataset is read by ONE code path: a source yields the official training
and test sets as ``uint8`` arrays, which are validated, cached in-process,
carved into train/validation, and (for :func:`make_dataset`) fed to one
``tf.data`` pipeline. The sources are tried in this order:

1. **Offline canonical files** -- the files the dataset authors publish:

   * MNIST / Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte``,
     ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
     ``t10k-labels-idx1-ubyte``), gzip-compressed (``.gz``) or not. They are
     parsed here with NumPy; the magic number (2051 images / 2049 labels), the
     dimensions, the file length, the label count and the label range are
     checked.
   * CIFAR-10: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``;
     CIFAR-100: ``cifar-100-python/train`` and ``test`` (fine labels). The
     pickles are read with a restricted unpickler that only accepts plain
     containers and NumPy arrays, never arbitrary classes. The original
     ``.tar.gz`` archives are accepted too (read without extracting).
   * SVHN (cropped digits): ``train_32x32.mat`` / ``test_32x32.mat``, read with
     ``scipy.io`` (optional dependency); label 10 is mapped to digit 0.

   With an explicit ``data_dir`` the files are looked for in ``data_dir``
   itself and in the dataset's sub-folders of it (e.g. ``data_dir/mnist/``,
   ``data_dir/fashion-mnist/``, ``data_dir/cifar-10-batches-py/``). Without
   ``data_dir`` the sub-folders (never the bare folder, which would be
   ambiguous between MNIST and Fashion-MNIST) of these roots are searched:
   ``$TF_BACKSMOOTH_DATA_DIR``, Keras' download cache
   (``$KERAS_HOME/datasets`` or ``~/.keras/datasets``) and
   ``/usr/share/datasets`` (Debian's ``dataset-fashion-mnist`` package
   installs ``/usr/share/datasets/fashion-mnist/``).
   MNIST is also read from Keras' own download, ``mnist.npz`` (what
   ``keras.datasets.mnist.load_data()`` writes to ``~/.keras/datasets/``;
   arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``), in ``data_dir``
   or in each of those roots themselves (the file name names the dataset).
   Keras' Fashion-MNIST download is the IDX files in ``fashion-mnist/``.

2. **tensorflow-datasets** (``tfds.builder(name, data_dir=data_dir)``) if its
   prepared copy exists. The network is never touched unless ``download=True``
   is passed explicitly: whether the data is prepared is found out by calling
   ``builder.as_dataset``, which raises immediately when the files are absent.
   (``builder.is_prepared()`` is deliberately not used: ``tfds.testing.
   mock_data`` patches ``as_dataset`` but not ``is_prepared``, so checking it
   would make the tfds path untestable.)

Any missing, incomplete or corrupt data, or a bad argument, raises
:class:`DataError`, whose message names what was looked for, where (full
paths), and how to fix it.

Splits
------
``"test"`` is the official test set. ``"train"`` and ``"validation"`` are a
seeded carve of the official training set: a permutation from
``np.random.default_rng(seed)`` puts its first ``validation_size`` indices in
``"validation"`` and the rest in ``"train"``; both keep the official order
(indices sorted), so ``validation_size=0`` gives exactly the official training
set. :func:`make_dataset` always carves with :data:`CARVE_SEED` (its ``seed``
only drives shuffling and augmentation), so train and validation never overlap
whatever the run seed.

Pipeline
--------
:func:`make_dataset` yields ``(x, y)`` batches: ``x`` float32 in ``[0, 1]`` of
shape ``[B, H, W, C]``, ``y`` int32 ``[B]``. It is the one pipeline:
``bin/train`` trains on ``make_dataset(name, "train", ...)`` (through
``train_lib.train_batches``), so ``model.fit`` in user code sees exactly
``bin/train``'s batches for the same seed. Its rules
(:func:`dataset_from_arrays`): epoch ``e``'s order is a permutation keyed on
``(seed, e)`` with :mod:`tf_backsmooth.rng` (shuffling is on by default for
"train"), so a run resumed at epoch ``e`` (``first_epoch=e``) sees exactly the
batches of an uninterrupted one; incomplete final batches are dropped by
default for "train"; ``epochs=E`` yields epochs ``first_epoch .. E-1`` as one
stream (give ``model.fit`` ``steps_per_epoch``), ``epochs=None`` one epoch,
``repeat=True`` an unbounded stream. Augmentation (default: training split of
CIFAR/SVHN) is the standard "random crop with 4 pixels of ZERO padding" of the
reference PyTorch code (``transforms.RandomCrop(32, padding=4)``, whose default
padding mode is constant 0), plus a random horizontal flip for CIFAR only (a
flipped digit is not the same digit). It runs on whole batches
(:func:`augment_batch`) with stateless random ops seeded from the global step
``t`` (``rng.fold_in(rng.fold_in(seed, rng.AUGMENT), t)``), so it is
deterministic from ``seed`` and differs between epochs. Batches use the GLOBAL
batch size (a ``tf.distribute`` strategy splits them).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

SPLITS = ("train", "validation", "test")

#: Seed of the train/validation carve used by :func:`make_dataset`.
CARVE_SEED = 0

#: Pixels of zero padding of the random-crop augmentation.
CROP_PADDING = 4

#: Environment variable naming an extra root folder for offline files.
DATA_DIR_ENV = "TF_BACKSMOOTH_DATA_DIR"


class DataError(ValueError):
    """Missing, incomplete or corrupt data, or a bad argument."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    ``mean``/``std`` are per-channel statistics of the official training set
    in ``[0, 1]`` pixel units, for the model's first (normalisation) layer.
    ``validation_size`` is the default number of training examples held out
    as the ``"validation"`` split. ``augment`` says whether the training split
    is augmented by default (random crop), ``hflip`` whether augmentation also
    flips horizontally.
    """

    name: str
    num_classes: int
    input_shape: tuple
    train_size: int
    test_size: int
    validation_size: int
    augment: bool
    hflip: bool
    mean: tuple
    std: tuple


# 1000 held-out examples is enough to pick a checkpoint or watch robust
# overfitting (as in Rice et al. 2020) while keeping PGD evaluation cheap.
DATASETS = {
    info.name: info
    for info in (
        DatasetInfo("mnist", 10, (28, 28, 1), 60000, 10000, 1000, False, False,
                    (0.1307,), (0.3081,)),
        DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60000, 10000, 1000, False, False,
                    (0.2860,), (0.3530,)),
        DatasetInfo("cifar10", 10, (32, 32, 3), 50000, 10000, 1000, True, True,
                    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        DatasetInfo("cifar100", 100, (32, 32, 3), 50000, 10000, 1000, True, True,
                    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        DatasetInfo("svhn_cropped", 10, (32, 32, 3), 73257, 26032, 1000, True, False,
                    (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    )
}


def get_info(name) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; DataError if unknown."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}."
        ) from None


# --------------------------------------------------------------------------
# Offline files: where to look
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a dataset's canonical files are named and read.

    ``members[split]`` lists the files a split needs; each file is a tuple of
    accepted names (e.g. with and without ``.gz``). ``archives`` are
    ``(archive name, folder inside the archive)`` pairs that hold the members.
    ``reader(info, blobs)`` turns the split's files into ``(x, y)``.
    ``npz`` names Keras' single-file downloads (``x_train``, ``y_train``,
    ``x_test``, ``y_test``), looked for in the search roots themselves.
    """

    folders: tuple
    members: dict
    reader: Callable
    archives: tuple = ()
    npz: tuple = ()


def _idx_members(prefix):
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    return tuple((name + ".gz", name) for name in names)


def _single(*names):
    return tuple((name,) for name in names)


def _member_names(layout, split):
    return [" or ".join(alternatives) for alternatives in layout.members[split]]


@functools.lru_cache(maxsize=None)
def _layouts():
    idx = {"train": _idx_members("train"), "test": _idx_members("t10k")}
    return {
        "mnist": _Layout(("mnist",), idx, _read_idx, npz=("mnist.npz",)),
        "fashion_mnist": _Layout(("fashion_mnist", "fashion-mnist"), idx, _read_idx),
        "cifar10": _Layout(
            ("cifar10", "cifar10/cifar-10-batches-py", "cifar-10-batches-py"),
            {"train": _single(*(f"data_batch_{i}" for i in range(1, 6))),
             "test": _single("test_batch")},
            _read_cifar(b"labels"),
            archives=(("cifar-10-python.tar.gz", "cifar-10-batches-py"),),
        ),
        "cifar100": _Layout(
            ("cifar100", "cifar100/cifar-100-python", "cifar-100-python"),
            {"train": _single("train"), "test": _single("test")},
            _read_cifar(b"fine_labels"),
            archives=(("cifar-100-python.tar.gz", "cifar-100-python"),),
        ),
        "svhn_cropped": _Layout(
            ("svhn_cropped", "svhn"),
            {"train": _single("train_32x32.mat"), "test": _single("test_32x32.mat")},
            _read_svhn_mat,
        ),
    }


class _FileBlob:
    """A plain (optionally gzip-compressed) file."""

    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)

    def stamp(self):
        stat = self.path.stat()
        return (self.where, stat.st_size, stat.st_mtime_ns)

    def read(self) -> bytes:
        try:
            if self.path.suffix == ".gz":
                with gzip.open(self.path, "rb") as f:
                    return f.read()
            return self.path.read_bytes()
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"Cannot read {self.where}: {e}. The file is corrupt or truncated; "
                "replace it with a fresh copy of the canonical file."
            ) from e


class _NpzBlob:
    """One split's arrays in a Keras ``.npz`` download."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = path, split
        self.where = f"{path} (x_{split}, y_{split})"

    def stamp(self):
        stat = self.path.stat()
        return (self.where, stat.st_size, stat.st_mtime_ns)

    def read_arrays(self):
        names = (f"x_{self.split}", f"y_{self.split}")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                missing = [n for n in names if n not in npz.files]
                if not missing:
                    return npz[names[0]], npz[names[1]]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(
                f"Cannot read {self.where}: {e}. The file is corrupt or truncated; "
                "replace it with a fresh keras.datasets download."
            ) from e
        raise DataError(
            f"{self.path} has no array {' or '.join(missing)}; Keras' download has x_train, "
            "y_train, x_test and y_test. Replace it with a fresh keras.datasets download."
        )


def _read_npz(info, blobs):
    (blob,) = blobs
    x, y = blob.read_arrays()
    return _checked(info, x, y, blob.where)


class _TarBlob:
    """A member of a ``.tar.gz`` archive, read without extracting."""

    def __init__(self, archive: Path, member: str):
        self.archive, self.member = archive, member
        self.where = f"{archive} (member {member})"

    def stamp(self):
        stat = self.archive.stat()
        return (self.where, stat.st_size, stat.st_mtime_ns)

    def read(self) -> bytes:
        try:
            with tarfile.open(self.archive, "r:gz") as tar:
                return tar.extractfile(self.member).read()
        except KeyError:
            raise DataError(
                f"{self.archive} has no member {self.member!r}; is it the canonical archive?"
            ) from None
        except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
            raise DataError(
                f"Cannot read {self.where}: {e}. The archive is corrupt or truncated; "
                "replace it with a fresh copy."
            ) from e


def _search_roots(data_dir):
    """``[data_dir]``, or the default roots in order."""
    if data_dir is not None:
        return [Path(data_dir).expanduser().absolute()]
    roots = []
    if os.environ.get(DATA_DIR_ENV):
        roots.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    keras_home = os.environ.get("KERAS_HOME") or os.path.join("~", ".keras")
    roots += [Path(keras_home).expanduser() / "datasets", Path("/usr/share/datasets")]
    return [root.absolute() for root in roots]


def _search_folders(name, data_dir):
    """Folders that may hold ``name``'s files, most specific first."""
    layout = _layouts()[name]
    roots = _search_roots(data_dir)
    folders = [root / sub for root in roots for sub in layout.folders]
    return folders + roots if data_dir is not None else folders


def _npz_files(name, data_dir):
    """Where a Keras ``.npz`` download of ``name`` may be, in order."""
    return [root / n for root in _search_roots(data_dir) for n in _layouts()[name].npz]


def _find_split(layout, folder, split):
    """The blobs of ``split`` in ``folder`` (plain files, then archives).

    Returns ``(blobs or None, names of present files)``.
    """
    blobs, present = [], []
    for alternatives in layout.members[split]:
        path = next((folder / n for n in alternatives if (folder / n).is_file()), None)
        blobs.append(path and _FileBlob(path))
        if path:
            present.append(path.name)
    if all(blobs):
        return blobs, present
    for archive, inner in layout.archives:
        if (folder / archive).is_file():
            members = [f"{inner}/{alts[0]}" for alts in layout.members[split]]
            return [_TarBlob(folder / archive, m) for m in members], [archive]
    return None, present


def _locate(name, data_dir, split):
    """Blobs of the official ``split`` ("train"/"test") or None if absent.

    Raises DataError when a folder holds only part of the split's files.
    """
    layout = _layouts()[name]
    partial = None
    for folder in _search_folders(name, data_dir):
        if not folder.is_dir():
            continue
        blobs, present = _find_split(layout, folder, split)
        if blobs:
            return blobs
        if present and partial is None:
            partial = (folder, present)
    npz = next((f for f in _npz_files(name, data_dir) if f.is_file()), None)
    if npz is not None:
        return [_NpzBlob(npz, split)]
    if partial:
        folder, present = partial
        raise DataError(
            f"Incomplete {name} {split} files in {folder}: found {present}, need all of "
            f"{_member_names(layout, split)}. Add the missing files or remove the folder."
        )
    return None


def find_offline_files(name, data_dir=None) -> Optional[dict]:
    """Which canonical files of ``name`` would be read, or None if none.

    Returns ``{"train": [...], "test": [...]}`` with the full path (or
    ``"archive (member m)"``) of each file; a split whose files are missing
    maps to None. Raises DataError for an unknown name or partial files.
    """
    get_info(name)
    found = {split: _locate(name, data_dir, split) for split in ("train", "test")}
    if not any(found.values()):
        return None
    return {split: blobs and [b.where for b in blobs] for split, blobs in found.items()}


def _describe_search(name, data_dir):
    layout = _layouts()[name]
    names = _member_names(layout, "train") + _member_names(layout, "test")
    archives = [archive for archive, _ in layout.archives]
    folders = "\n".join(f"  {f}" for f in _search_folders(name, data_dir))
    npz = "".join(f"\n  {f}" for f in _npz_files(name, data_dir))
    return (
        f"Looked for the canonical {name} files {names}"
        + (f" or the archive {archives}" if archives else "")
        + f" in:\n{folders}"
        + (f"\nand for Keras' download (keras.datasets.{name}.load_data()) at:{npz}"
           if npz else "")
    )


# --------------------------------------------------------------------------
# Offline files: parsing
# --------------------------------------------------------------------------


def _checked(info, x, y, where):
    """Validates decoded arrays of ``info``; returns (x uint8 NHWC, y int64)."""
    x = np.asarray(x)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8 or x.shape[1:] != tuple(info.input_shape):
        raise DataError(
            f"{where}: expected uint8 images of shape {tuple(info.input_shape)}, "
            f"got {x.dtype} {x.shape[1:]}."
        )
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels.")
    if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
        raise DataError(
            f"{where}: labels must be in [0, {info.num_classes}), found range "
            f"[{y.min()}, {y.max()}]."
        )
    return x, y


def _parse_idx(data: bytes, where: str, magic: int) -> np.ndarray:
    """An IDX file (big-endian header, unsigned bytes) as a NumPy array."""
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated IDX header ({len(data)} bytes).")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(
            f"{where}: bad IDX magic number {found} (expected {magic}); "
            "not an IDX file of this kind, or the wrong file."
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(
            f"{where}: file has {len(data)} bytes but its header (dims {dims}) "
            f"implies {expected}; the file is truncated or corrupt."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_idx(info, blobs):
    images, labels = blobs
    x = _parse_idx(images.read(), images.where, 2051)
    y = _parse_idx(labels.read(), labels.where, 2049)
    return _checked(info, x, y, f"{images.where} + {labels.where}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers and NumPy arrays only (the CIFAR pickle format)."""

    _ALLOWED = {
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar(label_key):
    def read(info, blobs):
        xs, ys = [], []
        for blob in blobs:
            try:
                batch = _ArrayUnpickler(io.BytesIO(blob.read()), encoding="bytes").load()
                data = np.asarray(batch[b"data"], np.uint8)
                labels = np.asarray(batch[label_key])
                h, w, c = info.input_shape
                xs.append(data.reshape(-1, c, h, w).transpose(0, 2, 3, 1))
            except DataError:
                raise
            except Exception as e:  # any malformed pickle
                raise DataError(
                    f"{blob.where}: not a valid {info.name} python batch "
                    f"(dict with b'data' and {label_key!r}): {type(e).__name__}: {e}"
                ) from e
            ys.append(labels)
        where = ", ".join(b.where for b in blobs)
        return _checked(info, np.concatenate(xs), np.concatenate(ys), where)

    return read


def _read_svhn_mat(info, blobs):
    (blob,) = blobs
    try:
        import scipy.io
    except ImportError:
        raise DataError(
            f"Reading {blob.where} needs scipy (pip install scipy), which is not "
            "installed; or prepare svhn_cropped with tensorflow-datasets instead."
        ) from None
    try:
        mat = scipy.io.loadmat(io.BytesIO(blob.read()))
        x = np.transpose(mat["X"], (3, 0, 1, 2))
        y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{blob.where}: not a valid SVHN .mat file (needs 'X' [32,32,3,N] and "
            f"'y'): {type(e).__name__}: {e}"
        ) from e
    return _checked(info, x, np.where(y == 10, 0, y), blob.where)


# --------------------------------------------------------------------------
# tensorflow-datasets
# --------------------------------------------------------------------------


def _tfds_source(info, split, data_dir, download):
    """``(cache key, loader)`` of the official ``split`` in tensorflow-datasets.

    Raises DataError (without touching the network unless ``download``) when
    tfds is missing or has no prepared copy.
    """
    search = _describe_search(info.name, data_dir)
    how_to_fix = (
        f"Fix: put the canonical files in one of the folders above (or pass "
        f"data_dir=...), or prepare the tfds copy on a machine with internet "
        f"(`tfds build {info.name}` or download=True) and copy its data_dir here."
    )
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"{search}\nand tensorflow-datasets is not importable ({e}).\n{how_to_fix}"
        ) from e
    builder = tfds.builder(info.name, data_dir=None if data_dir is None else str(data_dir))
    if download:
        builder.download_and_prepare()
    try:
        ds = builder.as_dataset(split=split, as_supervised=True)
    except (AssertionError, OSError, ValueError) as e:
        raise DataError(
            f"{search}\nand tensorflow-datasets has no prepared copy in "
            f"{builder.data_dir} (data_dir={data_dir!r}): {e}\n{how_to_fix}"
        ) from e

    def load():
        batches = list(tfds.as_numpy(ds.batch(4096)))
        if not batches:
            raise DataError(f"tfds {info.name} {split} in {builder.data_dir} is empty.")
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return _checked(info, x, y, f"tfds {info.name} {split} in {builder.data_dir}")

    return (info.name, split, "tfds", str(data_dir), str(builder.data_dir)), load


# --------------------------------------------------------------------------
# Loading, caching and carving
# --------------------------------------------------------------------------

_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_CACHE_SIZE = 6


def clear_cache():
    """Forgets the in-process cache of parsed arrays."""
    _CACHE.clear()


def _cached(key, load):
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    x, y = load()
    for array in (x, y):
        array.flags.writeable = False  # shared by later calls
    _CACHE[key] = (x, y)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return x, y


def _load_official(info, split, data_dir, download):
    """The official "train" or "test" set as read-only (uint8, int64) arrays."""
    blobs = _locate(info.name, data_dir, split)
    if blobs is None:
        key, load = _tfds_source(info, split, data_dir, download)
    else:
        key = (info.name, split, "files") + tuple(b.stamp() for b in blobs)
        reader = _read_npz if isinstance(blobs[0], _NpzBlob) else _layouts()[info.name].reader
        load = lambda: reader(info, blobs)  # noqa: E731
    return _cached(key, load)


def _check_count(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def load_arrays(name, split, data_dir=None, validation_size=None, seed=0,
                num_examples=None, *, download=False):
    """A split of dataset ``name`` as NumPy arrays.

    Returns ``(x, y)``: ``x`` uint8 ``[N, H, W, C]``, ``y`` int64 ``[N]``. The
    arrays may be read-only views of the in-process cache: copy before
    modifying. ``split`` is "train", "validation" (both carved from the
    official training set with ``np.random.default_rng(seed)``; the default
    ``validation_size`` is ``get_info(name).validation_size``, and 0 makes
    "train" the full official training set) or "test" (the official test
    set). ``num_examples`` keeps the first N examples of the split. Only
    ``download=True`` lets tensorflow-datasets use the network.
    """
    info = get_info(name)
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
    if num_examples is not None:
        num_examples = _check_count(num_examples, "num_examples", 1)
    if split == "test":
        x, y = _load_official(info, "test", data_dir, download)
    else:
        if validation_size is None:
            validation_size = info.validation_size
        validation_size = _check_count(validation_size, "validation_size", 0)
        if split == "validation" and validation_size == 0:
            raise DataError(
                f"split='validation' of {name} is empty with validation_size=0; "
                "pass validation_size > 0."
            )
        x, y = _load_official(info, "train", data_dir, download)
        if validation_size >= len(y):
            raise DataError(
                f"validation_size={validation_size} leaves no training examples: "
                f"{name} has {len(y)} official training examples."
            )
        if validation_size:
            order = np.random.default_rng(seed).permutation(len(y))
            held_out = order[:validation_size] if split == "validation" else order[validation_size:]
            index = np.sort(held_out)
            x, y = x[index], y[index]
    if num_examples is not None:
        if num_examples > len(y):
            raise DataError(
                f"num_examples={num_examples} but the {name} {split} split has only "
                f"{len(y)} examples."
            )
        x, y = x[:num_examples], y[:num_examples]
    return x, y


# --------------------------------------------------------------------------
# tf.data pipeline
# --------------------------------------------------------------------------


def to_float(x):
    """uint8 images (as :func:`load_arrays` returns them) as float32 in ``[0, 1]``."""
    return x.astype(np.float32) / 255.0


def augment_batch(images, seed, padding=CROP_PADDING, flip=True):
    """Random crop with zero padding (and optional horizontal flip) of a batch.

    ``images``: ``[B, H, W, C]`` tensor (any dtype; uint8 in the pipeline).
    Each image is zero-padded by ``padding`` pixels per side and cropped back
    to ``H x W`` at a uniformly random offset, then mirrored with probability
    1/2 if ``flip``. ``seed``: int32/int64 tensor of shape [2]; the result is
    a deterministic function of ``(images, seed)`` (stateless random ops).
    """
    import tensorflow as tf

    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [batch, 2], seed=crop_seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    if flip:
        mirror = tf.random.stateless_uniform([batch], seed=flip_seed) < 0.5
        out = tf.where(mirror[:, None, None, None], tf.reverse(out, axis=[2]), out)
    return out


PREFETCH_BATCHES = 2


def finish_pipeline(ds):
    """Prefetches ``PREFETCH_BATCHES`` batches and turns tf.data autotuning off.

    With autotuning on, deleting an iterator (at the end of every ``fit``)
    blocks until the autotune thread's next wake-up, and those wake-ups back
    off exponentially: measured on TF 2.21 here, ``fit`` calls with 2.6 s of
    work returned after 5.11 s in 3 of 6 tries, and ``git show 8b0fbb2:./bench/tfdata_teardown.py``
    saw deletions wait 0.12-1.10 s (none with autotuning off). Our pipelines
    are in-memory gathers plus an optional crop/flip, so fixed settings lose
    nothing: parallel maps use ``tf.data.AUTOTUNE``, which without autotuning
    means a fixed default parallelism (the core count, up to 16).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


def _check_epochs(first_epoch, epochs, repeat):
    """Validated ``(first_epoch, epochs or None)``: ``epochs=None`` means one
    epoch, or an unbounded stream with ``repeat``."""
    first_epoch = _check_count(first_epoch, "first_epoch", 0)
    if epochs is None:
        return first_epoch, None if repeat else first_epoch + 1
    if repeat:
        raise DataError(
            f"pass epochs={epochs!r} or repeat=True, not both: epochs ends the stream, "
            "repeat makes it unbounded."
        )
    return first_epoch, _check_count(epochs, "epochs", first_epoch)


def _check_seed(seed):
    """A run seed as ``bin/train`` takes it (``rng`` keys on it as int32)."""
    if _check_count(seed, "seed", 0) > 2**31 - 1:
        raise DataError(f"seed must be an integer in [0, 2**31 - 1], got {seed!r}.")


def dataset_from_arrays(x, y, batch_size, *, seed=0, shuffle=True, augment=False,
                        hflip=False, drop_remainder=True, first_epoch=0, epochs=None,
                        repeat=False):
    """THE batching pipeline, on arrays: batches of epochs ``first_epoch .. epochs-1``.

    ``x`` uint8 ``[N, H, W, C]`` and ``y`` integer ``[N]`` (as from
    :func:`load_arrays`) become ``(x float32 in [0, 1], y int32)`` batches of
    ``batch_size``. :func:`make_dataset` (hence ``bin/train``) calls it; the
    rules, which make a resumed run see exactly an uninterrupted run's batches:

    * Epoch ``e``'s order is the permutation ``argsort(rng.uniform([N],
      rng.fold_in(seed, e)))`` if ``shuffle`` (else the arrays' order): keyed on
      the epoch number, not on how many epochs this pipeline has produced.
    * ``drop_remainder`` drops each epoch's incomplete final batch (so every
      step has the global batch size); otherwise it is kept, smaller. Batches
      never span two epochs.
    * The batches are numbered by global step ``t`` from ``first_epoch *
      steps_per_epoch``; augmentation (zero-padded random crop, plus a
      horizontal flip if ``hflip``: :func:`augment_batch`) of step ``t`` is
      seeded with ``rng.fold_in(rng.fold_in(seed, rng.AUGMENT), t)``.
    * ``epochs=E`` gives epochs ``first_epoch .. E-1``, and iterating the
      dataset again replays them; ``repeat=True`` an unbounded stream of epochs
      ``first_epoch, first_epoch + 1, ...``; ``epochs=None`` one epoch per
      iteration: the first iteration is epoch ``first_epoch``, the next one
      ``first_epoch + 1`` and so on (a host-side counter), so ``model.fit(ds,
      epochs=5)`` sees ``bin/train``'s five epochs. Build such a dataset
      outside ``strategy.scope()`` (its counter is a plain variable).

    The result is deterministic given how many times it has been iterated.
    It is finished by :func:`finish_pipeline` (tf.data autotuning off).
    Raises DataError for a bad argument or a batch size that drops every
    example.
    """
    import tensorflow as tf

    from tf_backsmooth import rng

    batch_size = _check_count(batch_size, "batch_size", 1)
    _check_seed(seed)
    # A counter only where the epoch changes the batches (shuffled or augmented).
    per_iteration = epochs is None and not repeat and (shuffle or augment)
    first_epoch, epochs = _check_epochs(first_epoch, epochs, repeat)
    n = len(y)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    if steps == 0:
        raise DataError(
            f"batch_size={batch_size} is larger than the {n} examples and "
            "drop_remainder=True drops every batch; lower batch_size."
        )
    images = tf.constant(x)
    labels = tf.constant(np.asarray(y).astype(np.int32))

    def epoch_indices(epoch):
        if shuffle:
            order = tf.argsort(rng.uniform([n], rng.fold_in(seed, epoch)))
        else:
            order = tf.range(n, dtype=tf.int32)
        if drop_remainder:  # whole batches only (a static batch dimension too)
            order = order[: steps * batch_size]
        batches = tf.data.Dataset.from_tensor_slices(order).batch(
            batch_size, drop_remainder=drop_remainder)
        # Global step numbers of this epoch's batches (the augmentation key).
        epoch = tf.cast(epoch, tf.int64)
        return tf.data.Dataset.zip(
            (tf.data.Dataset.range(epoch * steps, (epoch + 1) * steps), batches))

    if per_iteration:
        with tf.init_scope():
            next_epoch = tf.Variable(first_epoch, dtype=tf.int64, trainable=False)
        epoch_numbers = tf.data.Dataset.from_tensors(np.int64(0)).map(
            lambda _: next_epoch.assign_add(1) - 1)
    elif epochs is None:
        epoch_numbers = tf.data.Dataset.counter(first_epoch)
    else:
        epoch_numbers = tf.data.Dataset.range(first_epoch, epochs)
    ds = epoch_numbers.flat_map(epoch_indices)
    if epochs is not None:  # flat_map hides the length; fit and len() want it
        ds = ds.apply(tf.data.experimental.assert_cardinality((epochs - first_epoch) * steps))

    def load(step, index):
        batch = tf.gather(images, index)
        if augment:
            batch = augment_batch(batch, rng.fold_in(rng.fold_in(seed, rng.AUGMENT), step),
                                  CROP_PADDING, hflip)
        return tf.cast(batch, tf.float32) / 255.0, tf.gather(labels, index)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return finish_pipeline(ds)


def make_dataset(name, split, batch_size, data_dir=None, shuffle=None, seed=0,
                 augment=None, num_examples=None, validation_size=None,
                 drop_remainder=None, repeat=False, *, first_epoch=0, epochs=None,
                 download=False):
    """A batched ``tf.data.Dataset`` of ``(x float32 [B,H,W,C] in [0,1], y int32 [B])``.

    The one pipeline: ``bin/train`` trains on ``make_dataset(name, "train",
    batch_size, seed=seed, first_epoch=..., epochs=...)``; see
    :func:`dataset_from_arrays` for the rules. ``batch_size`` is the GLOBAL
    batch size. Defaults by split:

    * ``shuffle``: True for "train" (epoch ``e``'s order is keyed on
      ``(seed, e)``), False otherwise (the split's order).
    * ``augment``: ``info.augment and split == "train"`` (zero-padded random
      crop, plus horizontal flip for CIFAR), keyed on the global step.
    * ``drop_remainder``: True for "train" (every step has the global batch
      size), False otherwise (the last batch of an epoch may be smaller).

    ``epochs=None`` yields one epoch per iteration (``first_epoch`` first,
    then the next one each time the dataset is iterated again), so
    ``model.fit(ds, epochs=5)`` trains on ``bin/train``'s five epochs; build it
    outside ``strategy.scope()``. ``epochs=E`` yields epochs ``first_epoch ..
    E-1`` in one iteration (and replays them when iterated again; give
    ``model.fit`` ``steps_per_epoch``, as ``bin/train`` does), ``repeat=True``
    an unbounded stream. A resumed run passes ``first_epoch`` (the epochs
    already done) and sees exactly the rest of an uninterrupted run.
    ``num_examples`` keeps the first N examples of the split. The carve into
    train/validation always uses
    :data:`CARVE_SEED`, not ``seed``. Bad arguments and missing data raise
    :class:`DataError`. tf.data autotuning is off for the result and for
    stages a caller appends (:func:`finish_pipeline`); re-enable it with
    ``ds.with_options(opts)`` where ``opts.autotune.enabled = True``.
    """
    info = get_info(name)
    batch_size = _check_count(batch_size, "batch_size", 1)
    _check_seed(seed)  # the arguments before loading anything
    _check_epochs(first_epoch, epochs, repeat)
    x, y = load_arrays(name, split, data_dir, validation_size, CARVE_SEED,
                       num_examples, download=download)
    train = split == "train"
    return dataset_from_arrays(
        x, y, batch_size, seed=seed,
        shuffle=train if shuffle is None else bool(shuffle),
        augment=(info.augment and train) if augment is None else bool(augment),
        hflip=info.hflip,
        drop_remainder=train if drop_remainder is None else bool(drop_remainder),
        first_epoch=first_epoch, epochs=epochs, repeat=repeat)
