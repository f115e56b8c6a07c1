"""Your own training method and attack through the public registry.

Registers ``goodfellow_at``: the adversarial training of Goodfellow et al. (2015),
``(1 - w) * CE(f(x), y) + w * CE(f(x'), y)``, where ``x'`` comes from a custom attack,
one signed step on the Carlini-Wagner margin from a uniform random start. Then it
trains a ``RobustModel`` with it for a few steps and scores the result with the
package's PGD evaluation and with the custom attack itself.

Data: the first 2048 Fashion-MNIST training images when the files are installed
(Debian's ``dataset-fashion-mnist`` or any place ``tf_backsmooth.data`` searches),
otherwise random images (``--synthetic`` forces that). 13 s on 2 CPU cores (2026-12-08).

    python examples/custom_method.py [--synthetic]
"""

import sys

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import attacks, data, evaluation, methods, models, objectives
from tf_backsmooth.robust_model import RobustModel

EPSILON = 0.1


# 1. The attack: attack(model_fn, x, y, params, seed) -> methods.AttackOutput.
#    `model_fn` runs the base model in inference mode (the method's attack mode);
#    `params` holds epsilon, step_size, steps, gamma, beta and the method's own
#    keywords (params.get(name)); `seed` is the step's stateless seed, so a run
#    repeats exactly and every replica draws its own noise.
def margin_step_attack(model_fn, x, y, params, seed):
    start = x + attacks.uniform_noise(tf.shape(x), params.epsilon, seed, x.dtype)
    start = attacks.project(start, x, params.epsilon)
    _, grad, _ = attacks.input_gradient(
        model_fn, start, lambda logits: objectives.margin_loss(y, logits))
    x_adv = attacks.project(attacks.sign_step(start, grad, params.step_size), x,
                            params.epsilon)
    return methods.AttackOutput(tf.stop_gradient(x_adv))


# 2. The objective: per-example terms; RobustModel minimises mean(natural + robust).
#    `model_fn` runs the base model in training mode inside the gradient tape.
def goodfellow_objective(model_fn, x, y, attack_output, params, seed):
    w = params.get("adv_weight")
    clean_logits, adv_logits = methods.forward_pair(model_fn, x, attack_output.x_adv)
    return methods.Terms(
        natural=(1.0 - w) * objectives.cross_entropy(y, clean_logits),
        robust=w * objectives.cross_entropy(y, adv_logits),
        clean_logits=clean_logits, adv_logits=adv_logits)


def check_adv_weight(extra):
    w = extra["adv_weight"]
    if not 0.0 <= w <= 1.0:
        raise methods.ConfigError(f"adv_weight must be in [0, 1], got {w!r}")


# 3. Register it: the name is then valid for RobustModel(method=...),
#    set_params and switch_method (bin/train's --method lists only the built-in names).
methods.register(methods.Method(
    name="goodfellow_at",
    attack=margin_step_attack,
    objective=goodfellow_objective,
    grad_evals=lambda p: 3,            # attack gradient + the two training passes
    default_step_size=lambda eps: 1.25 * eps,
    single_step=True,
    clean_in_objective=True,
    extra_defaults={"adv_weight": 0.5},
    check=check_adv_weight,
    reference="Goodfellow et al. 2015, with a one-step margin attack from a random start."))


def load_images(synthetic):
    if not synthetic:
        try:
            x, y = data.load_arrays("fashion_mnist", "train", num_examples=2048)
            x_test, y_test = data.load_arrays("fashion_mnist", "test", num_examples=256)
            return "Fashion-MNIST", (x, y), (x_test, y_test)
        except data.DataError:
            pass
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2304, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, size=2304)
    return "random images", (x[:2048], y[:2048]), (x[2048:], y[2048:])


def main(argv):
    keras.utils.set_random_seed(0)
    source, (x, y), (x_test, y_test) = load_images("--synthetic" in argv)
    train = data.dataset_from_arrays(x, y, batch_size=128, seed=0)  # bin/train's rules
    base = models.get("small_cnn", num_classes=10, input_shape=(28, 28, 1))
    model = RobustModel(base, method="goodfellow_at", epsilon=EPSILON, adv_weight=0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(train, epochs=2, verbose=0)
    logs = {k: round(float(v[-1]), 3) for k, v in history.history.items()}
    print(f"trained goodfellow_at on {len(x)} {source}, 2 epochs: {logs}")

    x_test = x_test.astype("float32") / 255.0
    report = evaluation.evaluate(base, x_test, y_test, [EPSILON], attacks=("pgd",),
                                 pgd_steps=10, seed=0)
    print(evaluation.format_table(report))

    # The custom attack also works on its own, on the base classifier.
    x_adv = margin_step_attack(lambda v: base(v, training=False),
                               tf.constant(x_test), tf.constant(y_test, tf.int32),
                               methods.resolve_params("goodfellow_at", epsilon=EPSILON),
                               attacks.make_seed(0)).x_adv
    acc = float(tf.reduce_mean(objectives.correct(y_test, base(x_adv, training=False))))
    print(f"accuracy under the custom margin attack (eps {EPSILON}): {acc:.3f}")
    print("custom method example: OK")


if __name__ == "__main__":
    main(sys.argv[1:])
