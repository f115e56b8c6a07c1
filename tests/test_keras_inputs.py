"""What Keras users bring: one-hot and label-smoothed targets, sample weights,
unscaled images, save_weights / load_weights before the first fit."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_backsmooth import attacks, evaluation, methods, objectives
from tf_backsmooth.robust_model import RobustModel


def _cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
                             keras.layers.ReLU(), keras.layers.Flatten(),
                             keras.layers.Dense(4)])


def _data(n=16):
    rs = np.random.RandomState(0)
    return rs.rand(n, 8, 8, 1).astype(np.float32), rs.randint(0, 4, n)


def _one_step(method, labels, x, sample_weight=None):
    kw = {} if method == "natural" else {"epsilon": 0.1}
    model = RobustModel(_cnn(), method=method, seed=3, **kw)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, labels, sample_weight=sample_weight, batch_size=len(x),
                        epochs=1, shuffle=False, verbose=0)
    return model, history.history


@pytest.mark.parametrize("method", methods.names())
def test_one_hot_targets_train_exactly_like_class_ids(method):
    x, y = _data()
    sparse, logs_sparse = _one_step(method, y, x)
    dense, logs_dense = _one_step(method, keras.utils.to_categorical(y, 4), x)
    for a, b in zip(sparse.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in logs_sparse:
        np.testing.assert_allclose(logs_dense[key], logs_sparse[key], rtol=1e-5, atol=1e-6)


def test_label_smoothed_cross_entropy_is_against_the_distribution():
    logits = tf.constant([[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, -2.0, 1.0]])
    y = np.array([0, 1])
    a = 0.1
    smooth = keras.utils.to_categorical(y, 4) * (1 - a) + a / 4
    log_p = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    expected = -(smooth * log_p).sum(1)  # = (1 - a) CE(y) + a/4 * sum_j -log p_j
    np.testing.assert_allclose(objectives.cross_entropy(smooth, logits).numpy(), expected,
                               rtol=1e-6)
    np.testing.assert_array_equal(objectives.correct(smooth, logits).numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(objectives.class_ids(smooth, logits).numpy(), y)
    # (batch, 1) integer labels stay class ids.
    np.testing.assert_allclose(objectives.cross_entropy(y[:, None], logits).numpy(),
                               objectives.cross_entropy(y, logits).numpy())
    # A label-smoothed run trains (and differs from the one-hot one).
    x, y = _data()
    smooth = keras.utils.to_categorical(y, 4) * 0.9 + 0.025
    _, logs = _one_step("trades", smooth, x)
    _, logs_hot = _one_step("trades", keras.utils.to_categorical(y, 4), x)
    assert np.isfinite(logs["loss"][0]) and logs["loss"][0] != logs_hot["loss"][0]


def test_attacks_and_evaluate_accept_one_hot_targets():
    x, y = _data()
    model = _cnn()
    hot = keras.utils.to_categorical(y, 4)
    fn = lambda t: model(t, training=False)  # noqa: E731
    for one, other in ((attacks.pgd(fn, x, y, 0.1, 0.03, 3, seed=[1, 2]),
                        attacks.pgd(fn, x, hot, 0.1, 0.03, 3, seed=[1, 2])),
                       (attacks.fgsm(fn, x, y, 0.1), attacks.fgsm(fn, x, hot, 0.1))):
        np.testing.assert_array_equal(one.numpy(), other.numpy())
    a = evaluation.evaluate(model, x, y, 0.1, attacks="pgd,pgd_margin", pgd_steps=3)
    b = evaluation.evaluate(model, x, hot, 0.1, attacks="pgd,pgd_margin", pgd_steps=3)
    assert a["attacks"] == b["attacks"] and a["clean_accuracy"] == b["clean_accuracy"]
    robust = RobustModel(model, epsilon=0.1)
    robust.compile(optimizer="sgd")
    np.testing.assert_allclose(robust.evaluate(x, hot, verbose=0),
                               robust.evaluate(x, y, verbose=0), rtol=1e-6)


def test_logged_loss_honours_sample_weights():
    """Logged loss = sum(w * loss) / n (Keras' convention and the value the
    step optimises); all-zero weights log 0 and leave the model unchanged."""
    x, y = _data()
    w = np.linspace(0.0, 2.0, len(x)).astype(np.float32)
    before = _cnn()
    ce = objectives.cross_entropy(y, before(x, training=False)).numpy()
    _, logs = _one_step("natural", y, x, sample_weight=w)
    np.testing.assert_allclose(logs["loss"][0], (w * ce).mean(), rtol=1e-5)
    correct = objectives.correct(y, before(x, training=False)).numpy()
    np.testing.assert_allclose(logs["clean_accuracy"][0], (w * correct).sum() / w.sum(),
                               rtol=1e-6)
    model, logs = _one_step("backward_smoothing", y, x, sample_weight=np.zeros(len(x)))
    assert logs["loss"][0] == 0.0
    for a, b in zip(model.base_model.get_weights(), _cnn().get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [
    lambda x, y: (np.round(x * 255).astype(np.uint8), y),
    lambda x, y: (tf.data.Dataset.from_tensor_slices((x * 255, y)).batch(8), None),
    lambda x, y: (keras.utils.PyDataset.__new__(_Batches).setup((x - 0.5) / 0.3, y), None),
], ids=["uint8_array", "dataset_0_255", "pydataset_standardised"])
def test_unscaled_inputs_are_refused_before_training(make):
    x, y = _data()
    data, labels = make(x, y)
    model = RobustModel(_cnn(), epsilon=0.1)
    model.compile(optimizer="sgd")
    weights = model.get_weights()
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\].*values in \[.*\].*Divide by 255"):
        model.fit(data, labels, epochs=1, verbose=0)
    assert model.optimizer.iterations.numpy() == 0
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)


class _Batches(keras.utils.PyDataset):
    def setup(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        return self

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.x[i * 8:(i + 1) * 8], self.y[i * 8:(i + 1) * 8]


def test_load_weights_before_the_first_fit_restores_the_optimizer(tmp_path):
    """save_weights after epoch 1, a new RobustModel + compile + load_weights,
    then epoch 2 == two uninterrupted epochs (Adam moments and step count
    restored; Keras no longer skips the optimizer's variables)."""
    x, y = _data(32)

    def make():
        model = RobustModel(_cnn(), method="backward_smoothing", epsilon=0.1, seed=1)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        return model

    full = make()
    full.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first = make()
    first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    first.save_weights(tmp_path / "a.weights.h5")
    resumed = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_weights(tmp_path / "a.weights.h5")
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert int(resumed.optimizer.iterations.numpy()) == 4
    resumed.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    for a, b in zip(full.get_weights() + full.optimizer.variables,
                    resumed.get_weights() + resumed.optimizer.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
