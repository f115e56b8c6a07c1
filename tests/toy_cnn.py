"""The small MNIST CNN that ``test_evaluation.py`` attacks and
``bench/eval_speed.py`` times (so the speed table describes the tested model)."""

import keras


def small_cnn():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10),
    ])


def trained_small_cnn(x, y):
    """``small_cnn`` trained with Adam for 2 epochs (batch 64, seed 0) on
    ``x`` (float32 in [0, 1]) and integer labels ``y``."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    return model
