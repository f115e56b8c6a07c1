"""Crash-safe files: every file tf_backsmooth writes goes through here.

:func:`write_bytes` writes to a temporary name in the target's folder,
flushes and fsyncs it, renames it over the target (``os.replace``, atomic on
POSIX) and fsyncs the folder, so a crash, a kill or a full disk at any instant
leaves either the previous complete file or the new one, never a mix.
Contents are built in memory first (Keras weights and ``.keras`` archives
too), so a full disk is an ``OSError`` from ``os.write``: h5py writing
straight to a full disk left a broken HDF5 object that crashed the process
with a segmentation fault at exit (seen on a 2 MB tmpfs). Errors name the
target file, not the temporary one.

Also here: the writable-folder probe, the run-directory lock and the one-line
description of an ``OSError``. A leaf module (no TensorFlow import at load).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import socket

TMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")
LOCK = "run.lock"


def _write_all(fd, data):
    """The one place bytes reach the disk (fault-injection tests patch it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(folder):
    """Makes a rename in ``folder`` durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data):
    """Atomically replaces ``path`` by ``data``; returns its sha256 (hex)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(err.errno, err.strerror, path) from None
    fsync_dir(folder)
    return hashlib.sha256(data).hexdigest()


def write_text(path, text):
    return write_bytes(path, text.encode())


def write_json(path, payload):
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True,
                                       default=str) + "\n")


_REQUIRED = object()


def read_json(path, default=_REQUIRED):
    """The JSON document in ``path``; ``default``, if given, when the file
    does not exist (otherwise ``FileNotFoundError``)."""
    if default is not _REQUIRED and not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    """The records of a JSON-lines file (``[]`` when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records):
    return write_text(path, "".join(json.dumps(r, sort_keys=True, default=str)
                                    + "\n" for r in records))


def append_jsonl(path, record):
    """Appends one record by rewriting the (small) file atomically."""
    return write_jsonl(path, read_jsonl(path) + [record])


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(model):
    """sha256 of all of ``model``'s weights (float32 bytes, in order): equal
    iff identical, for one architecture. numpy is imported here, not at load."""
    import numpy as np

    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w, np.float32).tobytes())
    return digest.hexdigest()


def save_weights(model, path):
    """``model.save_weights(path)`` (Keras' ``.weights.h5``), atomically;
    returns the file's sha256. Loads with ``model.load_weights(path)``."""
    from keras.src.saving import saving_lib  # the code of save_weights

    buf = io.BytesIO()
    store = saving_lib.H5IOStore(buf, mode="w")
    try:
        saving_lib._save_state(model, weights_store=store, assets_store=None,
                               inner_path="", visited_saveables=set())
    finally:
        store.close()
    return write_bytes(path, buf.getvalue())


def save_model(model, path):
    """``model.save(path)`` (a ``.keras`` archive), atomically."""
    from keras.src.saving import saving_lib  # the code of model.save

    buf = io.BytesIO()
    saving_lib.save_model(model, buf)
    return write_bytes(path, buf.getvalue())


def remove_stale_temporaries(folder):
    """Deletes temporary files left by a killed writer under ``folder``
    (call it while holding the run lock: no other writer is alive)."""
    for root, _, files in os.walk(folder):
        for name in files:
            if TMP_PATTERN.match(name):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(root, name))


def check_writable(folder):
    """Creates, writes, fsyncs and deletes a probe file in ``folder``;
    raises ``OSError`` naming ``folder`` when any of it fails."""
    folder = os.fspath(folder)
    probe = os.path.join(folder, f".write_probe.tmp{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, b"tf_backsmooth write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(probe)
        raise OSError(err.errno, err.strerror, folder) from None


def describe(err):
    """One line for an ``OSError``: the path and the cause."""
    what = err.strerror or str(err)
    hint = {errno.ENOSPC: "free some space (or choose another --model_dir) and "
                          "run the same command again to resume",
            errno.EDQUOT: "free some space and run the same command again",
            errno.EROFS: "the file system is read-only; choose another --model_dir",
            errno.EACCES: "check the permissions or choose another --model_dir",
            errno.EPERM: "check the permissions or choose another --model_dir",
            errno.EIO: "the disk reported an I/O error; check it, then run the "
                       "same command again to resume"}.get(err.errno)
    where = f"{err.filename}: " if err.filename else ""
    return where + what + (f" ({hint})" if hint else "")


_ERRNOS = {os.strerror(e): e for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                       errno.EACCES, errno.EPERM, errno.EIO)}


def oserror_from_text(text):
    """The ``OSError`` inside another library's error message, or None.

    TensorFlow's file writers (TensorBoard events) raise ``tf.errors.OpError``
    with messages like ``{{function_node ...}} /run/tb/events...; No space
    left on device``; this recovers the path and the cause."""
    for line in str(text).splitlines():
        for cause, code in _ERRNOS.items():
            if cause in line:
                where = re.sub(r"\{\{.*?\}\}", "", line.split(cause)[0])
                path = where.strip().rstrip(";:, ").strip() or None
                return OSError(code, cause, path)
    return None


class LockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``<folder>/run.lock`` holding the owner's PID.

    The kernel releases the lock when its process dies (even by SIGKILL), so
    a lock left by a dead run is simply taken over. The file itself stays
    (deleting it would let two processes lock two different files).
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK)
        self._fd = None

    def acquire(self):
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise LockedError(owner or "unknown process") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return previous or None

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
