"""The one place that turns a strategy name into a ``tf.distribute`` strategy.

* ``default``: TensorFlow's default (no-op) strategy, one device.
* ``one_device``: ``OneDeviceStrategy`` on the first GPU, else the CPU.
* ``mirrored``: ``MirroredStrategy`` over all local GPUs; with no GPU and
  ``num_cpu_devices=N`` the CPU is split into N logical devices (for tests:
  this must happen before TensorFlow initialises its devices).
* ``multi_worker``: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``.

A leaf module: it imports nothing else from the package.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


class StrategyError(ValueError):
    """A strategy cannot be built as asked."""


def split_cpu(num_devices):
    """Splits the first physical CPU into ``num_devices`` logical devices."""
    cpus = tf.config.list_physical_devices("CPU")
    try:  # must come before anything initialises the runtime
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as err:
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) >= num_devices:
            return  # already split (e.g. by the test harness)
        raise StrategyError(
            f"cannot split the CPU into {num_devices} devices: TensorFlow is "
            f"already initialised with {len(logical)} ({err})") from None


def get_strategy(name="default", num_cpu_devices=0):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            if num_cpu_devices:
                raise StrategyError("num_cpu_devices is for machines without "
                                    "a GPU; this one has GPUs")
            return tf.distribute.MirroredStrategy()
        if num_cpu_devices:
            split_cpu(num_cpu_devices)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        if num_cpu_devices:
            devices = devices[:num_cpu_devices]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise StrategyError("strategy multi_worker needs the TF_CONFIG "
                                "environment variable (cluster and task)")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except ValueError as err:
            raise StrategyError(f"TF_CONFIG is not valid JSON: {err}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise StrategyError(
        f"unknown strategy {name!r}; valid: default, one_device, mirrored, "
        "multi_worker")


def check_batch_size(global_batch_size, num_replicas):
    if global_batch_size % num_replicas:
        raise StrategyError(
            f"batch_size={global_batch_size} (the global batch) must be "
            f"divisible by the number of replicas ({num_replicas})")


def is_chief(strategy):
    """True on the worker that writes files (always True off multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())
