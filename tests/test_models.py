"""Tests of the model zoo (tf_backsmooth.models)."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tf_backsmooth import models

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)

# (model name, input shape, kwargs, trainable parameter count for 10 classes).
# The counts are those of the PyTorch reference models: TRADES SmallCNN
# (312,202), Wong et al.'s MNIST CNN, the CIFAR ResNet-18 (11,173,962), the
# PreAct ResNet-18 of Wong/Rice et al. with its final BN (11,172,170) and
# WRN-10-1 counted by hand: stem 432 + group blocks 4,672 + 14,432 + 57,536
# + final BN 128 + dense 650 = 77,850.
CASES = [
    ("small_cnn", MNIST, {}, 312202),
    ("small_cnn", CIFAR, {}, None),
    ("mnist_cnn", MNIST, {}, 166406),
    ("mnist_cnn", CIFAR, {}, None),
    # Madry et al.: 5*5*32+32 + 5*5*32*64+64 + 7*7*64*1024+1024 + 1024*10+10.
    ("madry_cnn", MNIST, {}, 3274634),
    ("mlp", MNIST, {"hidden": 16}, 784 * 16 + 16 + 16 * 10 + 10),
    ("mlp", CIFAR, {}, None),
    ("resnet18", CIFAR, {}, 11173962),
    ("preact_resnet18", CIFAR, {}, 11172170),
    ("wide_resnet", CIFAR, {"depth": 10, "width": 1}, 77850),
]
IDS = [f"{name}-{shape[-1]}ch" for name, shape, _, _ in CASES]


def _build(name, shape, kwargs, num_classes=10):
    mean = [0.5] * shape[-1]
    std = [0.25] * shape[-1]
    return models.get(name, num_classes, shape, mean=mean, std=std, **kwargs)


def _images(shape, n=4, seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape).astype("float32")


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name,shape,kwargs,params", CASES, ids=IDS)
def test_shapes_logits_and_architecture(name, shape, kwargs, params):
    model = _build(name, shape, kwargs, num_classes=7)
    assert model.input_shape == (None,) + shape
    out = model.predict(_images(shape), verbose=0)
    assert out.shape == (4, 7)
    # Logits, not probabilities: no softmax at the end.
    assert model.layers[-1].name == "logits"
    assert model.layers[-1].activation is keras.activations.linear
    assert not np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    assert (out < 0).any()
    if params is not None:
        assert _trainable_count(_build(name, shape, kwargs)) == params


@pytest.mark.parametrize("name,shape,kwargs,params", CASES[::2], ids=IDS[::2])
def test_normalization_is_first_layer(name, shape, kwargs, params):
    channels = shape[-1]
    mean = np.linspace(0.2, 0.6, channels)
    std = np.linspace(0.1, 0.3, channels)
    model = models.get(name, 10, shape, mean=mean, std=std, **kwargs)
    first = model.layers[1]
    assert isinstance(model.layers[0], keras.layers.InputLayer)
    assert isinstance(first, keras.layers.Normalization) and first.name == "normalize"
    x = _images(shape)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(first(x)), (x - mean) / std, rtol=1e-5, atol=1e-5
    )


def test_normalization_defaults_to_identity_and_validates():
    model = models.get("mlp", 10, MNIST)
    x = _images(MNIST)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[1](x)), x)
    with pytest.raises(ValueError, match="3 values"):
        models.get("mlp", 10, CIFAR, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        models.get("mlp", 10, MNIST, std=0.0)


@pytest.mark.parametrize("name,shape,kwargs,params", CASES, ids=IDS)
def test_one_training_step_changes_all_weights(name, shape, kwargs, params):
    model = _build(name, shape, kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.numpy().copy() for w in model.weights]
    labels = np.arange(4) % 10
    model.train_on_batch(_images(shape), labels)
    for w, old in zip(model.weights, before, strict=True):
        # Every trainable weight gets a gradient; BN moving statistics update.
        assert not np.array_equal(w.numpy(), old), f"{w.path} did not change"


def test_batchnorm_settings_and_has_batchnorm():
    model = _build("wide_resnet", CIFAR, {"depth": 10, "width": 1})
    bns = [layer for layer in model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    assert models.has_batchnorm(model)
    assert not models.has_batchnorm(_build("small_cnn", MNIST, {}))
    wrapper = keras.Sequential([keras.Input(CIFAR), model])
    assert models.has_batchnorm(wrapper)


def test_registry():
    assert {"small_cnn", "mnist_cnn", "madry_cnn", "mlp", "preact_resnet18", "resnet18",
            "wide_resnet"} <= set(models.MODELS)
    with pytest.raises(ValueError, match="valid names: .*small_cnn"):
        models.get("no_such_model", 10, MNIST)
    with pytest.raises(ValueError, match="6n\\+4"):
        models.get("wide_resnet", 10, CIFAR, depth=12, width=1)

    def tiny(x, num_classes):
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        return keras.layers.Dense(num_classes, name="logits")(x)

    try:
        models.register("test_tiny", tiny)
        model = models.get("test_tiny", 3, CIFAR)
        assert model.output_shape == (None, 3) and model.name == "test_tiny"
        with pytest.raises(ValueError, match="already registered"):
            models.register("test_tiny")(lambda x, n: x)
    finally:
        models.MODELS.pop("test_tiny", None)


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tf_backsmooth":
                raise ImportError("tf_backsmooth must not be needed to load")

    sys.meta_path.insert(0, Block())
    import keras
    import numpy as np

    for path in json.loads(sys.argv[1]):
        model = keras.models.load_model(path + ".keras")
        x = np.load(path + "_x.npy")
        np.save(path + "_reloaded.npy", model.predict(x, verbose=0))
    assert not any(m.startswith("tf_backsmooth") for m in sys.modules)
    """
)


@pytest.mark.slow  # a subprocess per model
def test_saved_models_reload_with_plain_keras(tmp_path):
    """One subprocess that cannot import tf_backsmooth reloads every model."""
    expected, paths = {}, []
    for i, (name, shape, kwargs, _) in enumerate(CASES):
        if shape != CIFAR and name != "small_cnn":
            continue
        model = _build(name, shape, kwargs)
        path = str(tmp_path / f"model{i}")
        x = _images(shape, seed=i)
        np.save(path + "_x.npy", x)
        model.save(path + ".keras")
        expected[path] = model.predict(x, verbose=0)
        paths.append(path)
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, json.dumps(paths)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path in paths:
        np.testing.assert_allclose(
            np.load(path + "_reloaded.npy"), expected[path], rtol=1e-5, atol=1e-6
        )


def test_torch_init_draws_kernels_and_biases_like_pytorch():
    """PyTorch's Conv2d/Linear default: kernel and bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in)); Keras': Glorot kernels, zero biases."""
    keras.utils.set_random_seed(0)
    model = models.get("mnist_cnn", 10, MNIST, init="torch")
    keras.utils.set_random_seed(0)
    glorot = models.get("mnist_cnn", 10, MNIST)
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        kernel, bias = (w.numpy() for w in (layer.kernel, layer.bias))
        bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
        for w in (kernel, bias):
            assert np.abs(w).max() <= bound
            assert np.abs(w).max() > 0.5 * bound  # spread over the whole interval
        # Uniform on [-b, b]: standard deviation b / sqrt(3).
        assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
        # Independent draws: the bias is not a copy of the kernel's first entries
        # (what an unseeded Keras initializer called twice gives).
        assert np.abs(bias - kernel.reshape(-1)[:len(bias)]).max() > 0.1 * bound
        assert not np.allclose(kernel, glorot.get_layer(layer.name).kernel.numpy())
        assert np.all(glorot.get_layer(layer.name).bias.numpy() == 0)
    with pytest.raises(ValueError, match="init"):
        models.get("mlp", 10, MNIST, init="he")


@pytest.mark.slow  # a fresh interpreter
def test_package_exposes_its_modules_lazily():
    """`import tf_backsmooth as tbs; tbs.models.get(...)` etc. work without
    importing the submodules first."""
    from conftest import REPO

    code = ("import tf_backsmooth as tbs, sys; "
            "assert 'tf_backsmooth.models' not in sys.modules; "
            "m = tbs.models.get('mlp', 10, (28, 28, 1)); "
            "names = ['RobustModel', 'attacks', 'objectives', 'methods', 'models', 'data', "
            "'evaluation', 'co_guard', 'callbacks', 'schedules']; "
            "assert all(hasattr(tbs, n) and n in dir(tbs) for n in names); "
            "assert tbs.evaluation.evaluate and tbs.data.load_arrays and tbs.callbacks.Backup; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=str(REPO))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    import tf_backsmooth
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        tf_backsmooth.nonexistent  # noqa: B018


def test_config_names_match_the_registries():
    """config.py lists names without importing TensorFlow; these lists must stay
    equal to the registries they copy."""
    from tf_backsmooth import co_guard, config, data, methods

    assert set(config.METHODS) == set(methods.names())
    assert set(config.MODELS) == set(models.MODELS)
    assert set(config.DATASETS) == set(data.DATASETS)
    for rule in config.CO_RULES:  # every listed rule is one collapse_detected knows
        assert co_guard.collapse_detected([0.9], 0.0, 0.9, rule=rule) in (True, False)
    with pytest.raises(config.ConfigError, match="rule must be one of"):
        co_guard.collapse_detected([0.9], 0.0, 0.9, rule="no_such_rule")
    assert set(config.CO_POLICIES) == set(co_guard.POLICIES) - {"none"}  # "none" = --co_guard=false
