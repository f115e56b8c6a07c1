"""Shared test setup.

TensorFlow is configured once, before first use: the CPU is split into two
logical devices so distribution tests can run a 2-replica MirroredStrategy
(single-device code keeps running on CPU:0).
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

# isort: off
# Before TensorFlow, as a user's program would: the package chooses
# TensorFlow's CPU kernels for this CPU kind (tf_backsmooth.cpu).
import tf_backsmooth  # noqa: E402, F401
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
# isort: on

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # already initialised by an earlier import
    pass

MODES = ("eager", "graph", "xla")


def shared_data_dir(name):
    """``<repo>/../shared/data/<name>``: the workplace's read-only data."""
    return REPO.parent / "shared" / "data" / name


@pytest.fixture
def mnist_dir():
    path = shared_data_dir("mnist")
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {path}")
    return path


def run_in_mode(fn, mode):
    """Runs ``fn()`` eagerly, as a graph, or XLA-compiled."""
    if mode == "eager":
        return fn()
    return tf.function(fn, jit_compile=(mode == "xla"))()


_TWO_REPLICAS = []


def two_replica_strategy():
    """One shared 2-replica MirroredStrategy on the two logical CPUs.

    Shared because several MirroredStrategy objects in one process can reuse
    collective instance keys and abort each other's all-reduces.
    """
    if not _TWO_REPLICAS:
        _TWO_REPLICAS.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _TWO_REPLICAS[0]


_SLOW_LIST = pathlib.Path(__file__).with_name("slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    """Marks the tests listed in slow_tests.txt (measured heavy) as `slow`, so
    `pytest -m "not slow"` is the quick tier; CI runs every test."""
    listed = {line.strip() for line in _SLOW_LIST.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    here = pathlib.Path(__file__).parent
    for item in items:
        # Keyed on the path from the repository root whatever the rootdir.
        key = f"tests/{item.path.relative_to(here).as_posix()}::{item.nodeid.split('::', 1)[1]}"
        if key in listed:
            item.add_marker(pytest.mark.slow)
