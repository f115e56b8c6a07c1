"""tf_backsmooth: efficient adversarial robust training for Keras 3 on TensorFlow.

Implements Backward Smoothing (Chen et al., arXiv 2010.01278) and its baselines
(PGD-AT, TRADES, FGSM-RS, Fast TRADES, GradAlign, N-FGSM) as a custom
``keras.Model`` (:class:`RobustModel`) whose ``train_step`` runs the attack and
the objective in graph mode or XLA, on one device or under a
``tf.distribute`` strategy.

The heavy submodules are imported lazily so that ``import tf_backsmooth`` is
cheap and ``tf_backsmooth.config`` can be used without TensorFlow.

Imported before TensorFlow, the package chooses TensorFlow's CPU kernel
library for this CPU kind (:mod:`tf_backsmooth.cpu`: oneDNN on AVX2 CPUs,
where TensorFlow leaves it off and it measured faster); a
``TF_ENABLE_ONEDNN_OPTS`` set by the user always wins.
"""

from tf_backsmooth import cpu as _cpu

__version__ = "0.1.0"

_cpu.choose()

MIN_TENSORFLOW = (2, 16)


def check_tensorflow():
    """Raises ImportError with install advice unless TF >= 2.16 with Keras 3."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            "tf_backsmooth needs TensorFlow >= 2.16: pip install "
            "'tf_backsmooth[cpu]' (or '[gpu]'), or install TensorFlow yourself"
        ) from err
    version = tuple(int(p) for p in tf.__version__.split(".")[:2])
    if version < MIN_TENSORFLOW:
        raise ImportError(
            f"tf_backsmooth needs TensorFlow >= 2.16 (Keras 3); found {tf.__version__}")

_LAZY = {
    "RobustModel": ("tf_backsmooth.robust_model", "RobustModel"),
    "attacks": ("tf_backsmooth.attacks", None),
    "objectives": ("tf_backsmooth.objectives", None),
    "methods": ("tf_backsmooth.methods", None),
    "models": ("tf_backsmooth.models", None),
    "data": ("tf_backsmooth.data", None),
    "evaluation": ("tf_backsmooth.evaluation", None),
    "co_guard": ("tf_backsmooth.co_guard", None),
    "callbacks": ("tf_backsmooth.callbacks", None),
    "schedules": ("tf_backsmooth.schedules", None),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        check_tensorflow()
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    raise AttributeError(f"module 'tf_backsmooth' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
