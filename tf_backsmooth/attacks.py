"""L-infinity attacks as pure TensorFlow functions built from small shared parts.

Parts: a stateless random start (:func:`uniform_noise`, :func:`normal_noise`),
the input gradient of a per-example surrogate loss (:func:`input_gradient`), a
sign step (:func:`sign_step`), the projection onto the eps-ball and ``[0, 1]``
(:func:`project`), and the loop that chains them (:func:`iterate`). Every
attack below is a few lines over these parts; none owns Keras state.

Conventions
-----------
* ``model_fn`` is any callable ``x -> logits``. The caller decides the mode
  (e.g. ``lambda x: model(x, training=False)``).
* ``x`` holds images in ``[0, 1]``; ``epsilon`` and step sizes are in the same
  pixel units. Inputs outside ``[0, 1]`` are not rejected (that would need a
  data-dependent check inside compiled code): the result is always clipped to
  ``[0, 1]``, so such inputs are silently pulled into range.
* Each attack returns ``x_adv`` with its gradient stopped.
* Randomness is stateless (:mod:`tf_backsmooth.rng`): ``seed`` is an int or an
  int tensor of shape ``[2]``; the same seed gives the same result in eager,
  graph and XLA mode. ``init_noise``/``logit_noise`` replace the draw.
  ``seed=None`` draws a fresh seed from the global (stateful) RNG.
"""

from __future__ import annotations

import tensorflow as tf

from tf_backsmooth import objectives
from tf_backsmooth import rng

# Loss scale applied to the attack's surrogate loss when the model computes in
# float16: the perturbation only uses the gradient's sign, which a positive
# scale leaves unchanged, while tiny float16 gradients would underflow to 0.
FLOAT16_INPUT_GRAD_SCALE = 2.0**12


# ----------------------------------------------------------------------------
# Random parts (see rng.py: identical numbers in eager, graph and XLA)
# ----------------------------------------------------------------------------
make_seed = rng.make_seed
fold_in = rng.fold_in


def uniform_noise(shape, radius, seed, dtype=tf.float32):
    """``U(-radius, radius)`` of ``shape`` from a stateless ``seed``."""
    return rng.uniform(shape, seed, -radius, radius, dtype)


def normal_noise(shape, stddev, seed, dtype=tf.float32):
    """``stddev * N(0, 1)`` of ``shape`` from a stateless ``seed``."""
    return tf.cast(stddev, dtype) * rng.normal(shape, seed, dtype)


# ----------------------------------------------------------------------------
# Deterministic parts
# ----------------------------------------------------------------------------
def project(x_adv, x, epsilon, to_ball=True):
    """Projects onto the L-inf ``epsilon``-ball around ``x``, then ``[0, 1]``."""
    if to_ball:
        x_adv = tf.clip_by_value(x_adv, x - epsilon, x + epsilon)
    return tf.clip_by_value(x_adv, 0.0, 1.0)


def sign_step(x_adv, grad, step_size):
    """One signed-gradient step (use a negative ``step_size`` to descend)."""
    return x_adv + step_size * tf.sign(grad)


def input_gradient(model_fn, x_adv, loss_fn):
    """Returns ``(per_example_loss, d sum(loss) / d x_adv, logits)``.

    Summing the per-example losses makes each example's gradient independent
    of the rest of the batch. Under a float16 model the summed loss is scaled
    (see ``FLOAT16_INPUT_GRAD_SCALE``) so the gradient does not underflow.
    """
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        logits = model_fn(x_adv)
        loss = loss_fn(logits)
        total = tf.reduce_sum(loss)
        if logits.dtype == tf.float16:
            total = total * FLOAT16_INPUT_GRAD_SCALE
    grad = tape.gradient(total, x_adv)
    return loss, grad, logits


def iterate(model_fn, x, x_adv, loss_fn, epsilon, step_size, steps,
            to_ball=True):
    """``steps`` iterations of ``x_adv <- project(x_adv + a*sign(grad loss))``.

    ``steps`` must be a Python int (the loop is a ``tf.while_loop``, so the
    graph does not grow with it). Returns ``x_adv`` with gradients stopped.
    """
    x = tf.stop_gradient(x)
    x_adv = tf.stop_gradient(x_adv)
    if steps <= 0:
        return x_adv

    def body(i, x_adv):
        _, grad, _ = input_gradient(model_fn, x_adv, loss_fn)
        x_adv = project(sign_step(x_adv, grad, step_size), x, epsilon, to_ball)
        return i + 1, tf.stop_gradient(x_adv)

    _, x_adv = tf.while_loop(lambda i, _: i < steps, body,
                             (tf.constant(0), x_adv),
                             maximum_iterations=steps)
    return x_adv


def surrogate(loss, y=None, target_logits=None):
    """Builds a per-example ``logits -> loss`` function by name.

    ``"ce"`` and ``"margin"`` need labels ``y``; ``"kl"`` needs
    ``target_logits`` and returns ``KL(softmax(target) || softmax(logits))``.
    """
    if loss == "ce":
        return lambda logits: objectives.cross_entropy(y, logits)
    if loss == "margin":
        return lambda logits: objectives.margin_loss(y, logits)
    if loss == "kl":
        target = tf.stop_gradient(target_logits)
        return lambda logits: objectives.kl_divergence(target, logits)
    raise ValueError(f"loss must be 'ce', 'margin' or 'kl', got {loss!r}")


def _start(x, epsilon, random_start, seed, init_noise, radius=None):
    """The starting point: ``x``, or ``x`` plus (given or uniform) noise."""
    x = tf.convert_to_tensor(x)
    if init_noise is not None:
        return x + tf.cast(init_noise, x.dtype)
    if random_start:
        radius = epsilon if radius is None else radius
        return x + uniform_noise(tf.shape(x), radius, seed, x.dtype)
    return x


# ----------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------
def fgsm(model_fn, x, y, epsilon, step_size=None, random_start=False,
         seed=None, *, init_noise=None, init_radius=None, to_ball=True,
         loss="ce", clip_start=True):
    """Fast gradient sign method, optionally from a random start (FGSM-RS).

    ``step_size`` defaults to ``epsilon``. With ``random_start`` the start is
    ``x + U(-r, r)`` with ``r = init_radius`` (default ``epsilon``), projected;
    ``init_noise`` replaces the draw. ``to_ball=False`` skips the projection onto
    the eps-ball (N-FGSM), keeping only the clip to ``[0, 1]``.

    ``clip_start=False`` takes the gradient at the unprojected start
    ``x + delta`` (values in ``[-r, 1 + r]``), as Wong et al.'s MNIST code
    does; only the result is projected. With ``step_size >= 2 * r`` (their
    0.375 at eps 0.3 is not) both give the same result for the same gradient
    sign; what differs is where the gradient is taken. See
    docs/MNIST_RECIPES.md for when it matters.
    """
    step_size = epsilon if step_size is None else step_size
    x = tf.convert_to_tensor(x)
    x_adv = _start(x, epsilon, random_start, seed, init_noise, init_radius)
    if clip_start:
        x_adv = project(x_adv, x, epsilon, to_ball)
    return iterate(model_fn, x, x_adv, surrogate(loss, y), epsilon, step_size,
                   1, to_ball)


def pgd(model_fn, x, y, epsilon, step_size, steps, loss="ce",
        random_start=True, restarts=1, seed=None, *, init_noise=None):
    """Projected gradient descent (Madry et al.) on CE or the CW margin.

    With ``restarts > 1`` every restart starts from its own uniform draw
    (restart ``r`` uses ``fold_in(seed, r)``, so restart 0 repeats the
    single-start attack) and each example keeps its worst case: misclassified
    beats correct, then the higher loss wins. More restarts are therefore never
    weaker than one. ``init_noise`` (one start) replaces the random draw.
    """
    x = tf.convert_to_tensor(x)
    loss_fn = surrogate(loss, y)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    seed = make_seed(seed) if (random_start and init_noise is None) else None

    def one_start(r):
        start_seed = fold_in(seed, r) if seed is not None else None
        x0 = project(_start(x, epsilon, random_start, start_seed, init_noise),
                     x, epsilon)
        return iterate(model_fn, x, x0, loss_fn, epsilon, step_size, steps)

    best = one_start(0)
    if restarts == 1:
        return best
    best_loss, best_wrong = _score(model_fn, best, y, loss_fn)
    for r in range(1, restarts):
        cand = one_start(r)
        cand_loss, cand_wrong = _score(model_fn, cand, y, loss_fn)
        better = (cand_wrong > best_wrong) | (
            (cand_wrong == best_wrong) & (cand_loss > best_loss))
        best = tf.where(_expand_like(better, x), cand, best)
        best_loss = tf.where(better, cand_loss, best_loss)
        best_wrong = tf.where(better, cand_wrong, best_wrong)
    return tf.stop_gradient(best)


def _score(model_fn, x_adv, y, loss_fn):
    logits = model_fn(x_adv)
    return loss_fn(logits), 1.0 - objectives.correct(y, logits)


def _expand_like(mask, x):
    """Reshapes a per-example mask ``[B]`` to broadcast against ``x``."""
    return tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1))


def trades_kl(model_fn, x, epsilon, step_size, steps, init_noise=None,
              seed=None, *, clean_logits=None, init="normal"):
    """TRADES inner maximisation of ``KL(softmax(f(x)) || softmax(f(x')))``.

    Starts at ``x + 0.001 * N(0, 1)`` (``init="normal"``, as in the TRADES
    code) or ``x + U(-eps, eps)`` (``init="uniform"``, Fast TRADES), or at
    ``x + init_noise`` when given; the start is projected (the reference
    feeds the unclipped start to the first forward pass: a 0.001-scale
    difference, kept in range here so the model never sees inputs outside
    ``[0, 1]``). Then ``steps`` sign-ascent steps. ``clean_logits`` (the
    target ``f(x)``) can be passed to save a forward pass.
    """
    x = tf.convert_to_tensor(x)
    if clean_logits is None:
        clean_logits = model_fn(x)
    if init_noise is None:
        if init == "normal":
            init_noise = normal_noise(tf.shape(x), 0.001, seed, x.dtype)
        elif init == "uniform":
            init_noise = uniform_noise(tf.shape(x), epsilon, seed, x.dtype)
        else:
            raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}")
    x_adv = project(_start(x, epsilon, False, None, init_noise), x, epsilon)
    return iterate(model_fn, x, x_adv, surrogate("kl", target_logits=clean_logits),
                   epsilon, step_size, steps)


def backward_smoothing(model_fn, x, epsilon, step_size, gamma=1.0, steps=1,
                       logit_noise=None, seed=None):
    """Backward Smoothing (Chen et al. 2020), Algorithm 1's inner problem.

    1. ``z = f(x)``; ``u ~ U(-1, 1)`` per example and class (or ``logit_noise``).
    2. Backward step: ``x1 = clip(x - a * sign(grad_x KL(softmax(z + gamma*u)
       || softmax(f(x)))))``, the smoothed target detached. The one forward
       pass at ``x`` gives both ``z`` and this gradient.
    3. ``steps`` TRADES steps from ``x1`` on ``KL(softmax(z) || softmax(f(.)))``.
    """
    return backward_smoothing_with_logits(model_fn, x, epsilon, step_size,
                                          gamma, steps, logit_noise, seed)[0]


def backward_smoothing_with_logits(model_fn, x, epsilon, step_size, gamma=1.0,
                                   steps=1, logit_noise=None, seed=None):
    """As :func:`backward_smoothing`; also returns the clean logits ``f(x)``."""
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    state = {}

    def smoothed_kl(logits):
        # Called once, on the forward pass at x: capture z = f(x) from it.
        state["z"] = tf.stop_gradient(logits)
        noise = logit_noise
        if noise is None:
            noise = uniform_noise(tf.shape(logits), 1.0, seed, tf.float32)
        target = tf.cast(state["z"], tf.float32) + gamma * tf.cast(
            noise, tf.float32)
        return objectives.kl_divergence(target, logits)

    _, grad, _ = input_gradient(model_fn, x, smoothed_kl)
    clean_logits = state["z"]
    x1 = tf.stop_gradient(project(sign_step(x, grad, -step_size), x, epsilon))
    x_adv = iterate(model_fn, x, x1, surrogate("kl", target_logits=clean_logits),
                    epsilon, step_size, steps)
    return x_adv, clean_logits
