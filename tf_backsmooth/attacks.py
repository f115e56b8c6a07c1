"""L-infinity attacks as pure TensorFlow functions built from small shared parts.

Parts: a stateless random start (:func:`uniform_noise`, :func:`normal_noise`),
the input gradient of a per-example surrogate loss (:func:`input_gradient`), a
sign step (:func:`sign_step`), the projection onto the eps-ball and ``[0, 1]``
(:func:`project`), and the loop that chains them (:func:`iterate`). Every
attack below is a few lines over these parts; none owns Keras state. The
evaluation attacks are here too: Square (:func:`square`), FAB-T
(:func:`fab_targeted`) and APGD with its DLR losses (:func:`apgd`; also
importable from :mod:`tf_backsmooth.evaluation`, which runs them per batch).

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

import collections
import math

import numpy as np
import tensorflow as tf

from tf_backsmooth import fastgrad, objectives, rng

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
#: Whether :func:`fused` compiles with XLA (False: plain graph functions, the
#: same results up to float rounding; for platforms without XLA).
FUSE_WITH_XLA = True


def fused(fn):
    """``fn`` (tensors in, tensors out, no model inside) as one XLA cluster.

    The attacks' bookkeeping around the model (APGD's step and state update,
    Square's candidate, FAB's projection) is dozens of element-wise ops on image-sized tensors per
    iteration; in graph mode each is a kernel launch and a pass over memory,
    under XLA they fuse into a few. The model itself stays outside: XLA's
    CPU convolutions are slower than oneDNN's (BUILD_NOTES.md, "XLA inside
    the attacks"). Compiled once per input shape and dtype.
    """
    if not FUSE_WITH_XLA:
        return fn
    if fn not in _FUSED:
        # No reduce_retracing: it relaxes ranks too, which the element-wise
        # code needs; XLA compiles per concrete shape in any case.
        _FUSED[fn] = tf.function(fn, jit_compile=True, autograph=False)
    return _FUSED[fn]


_FUSED = {}  # one compiled function per Python function (eager loops reuse it)


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
    with fastgrad.input_gradient_override():
        grad = tape.gradient(total, x_adv)
    return loss, grad, logits


#: ``iterate`` unrolls loops of at most this many steps into straight-line ops
#: (longer ones stay a ``tf.while_loop``). The same ops either way; unrolled,
#: XLA fuses across the steps and graph mode skips the loop's control flow
#: (XLA on CPU: per-replica BS step on ResNet-18 1.14x faster than with the
#: loop; BUILD_NOTES.md, "Backward Smoothing step: profile and speed").
UNROLL_MAX_STEPS = 2


def iterate(model_fn, x, x_adv, loss_fn, epsilon, step_size, steps,
            to_ball=True):
    """``steps`` iterations of ``x_adv <- project(x_adv + a*sign(grad loss))``.

    ``steps`` must be a Python int: up to :data:`UNROLL_MAX_STEPS` steps are
    unrolled, more run as a ``tf.while_loop`` (so the graph does not grow
    with them). Returns ``x_adv`` with gradients stopped.
    """
    x = tf.stop_gradient(x)
    x_adv = tf.stop_gradient(x_adv)
    if steps <= 0:
        return x_adv
    if steps <= UNROLL_MAX_STEPS:
        for _ in range(steps):
            _, grad, _ = input_gradient(model_fn, x_adv, loss_fn)
            x_adv = tf.stop_gradient(
                project(sign_step(x_adv, grad, step_size), x, epsilon, to_ball))
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
    docs/MNIST_STUDY.md (section 3) for when it matters.
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


# ----------------------------------------------------------------------------
# Square Attack (score-based, no gradients)
# ----------------------------------------------------------------------------
SQUARE_P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(i, n_queries, p_init=0.8):
    """Square's p-schedule: the fraction of pixels the square covers at query ``i``.

    AutoAttack's schedule rescaled to ``n_queries`` (``resc_schedule``): with
    ``r = int(i / n_queries * 10000)`` (float64, as the reference computes it),
    ``p = p_init / 2^k`` where ``k`` is how many of ``SQUARE_P_THRESHOLDS``
    lie strictly below ``r``. ``i`` may be a Python int or an int32 tensor.
    """
    r = tf.floor(tf.cast(i, tf.float64) / float(n_queries) * 10000.0)
    k = tf.reduce_sum(tf.cast(r > tf.constant(SQUARE_P_THRESHOLDS, tf.float64), tf.float64))
    return p_init / tf.pow(tf.constant(2.0, tf.float64), k)


def square_size(p, height, width):
    """Side of the square: ``max(round(sqrt(p * H * W)), 1)``, at most ``min(H, W)``."""
    side = tf.round(tf.sqrt(tf.cast(p, tf.float64) * float(height * width)))
    return tf.cast(tf.clip_by_value(side, 1.0, float(min(height, width))), tf.int32)


def _square_draws(seed, i, index, n):
    """Square's ``n`` uniform draws per example at query ``i`` (0: the start)."""
    return rng.uniform_rows(fold_in(fold_in(seed, i), index), n)


def _square_candidate(i, x_best, x_low, x_high, seed, index, n_queries, p_init):
    """Square's candidate at query ``i``: ``x_best`` with one square per
    example set to ``x_low`` or ``x_high`` per channel (see :func:`square`)."""
    _, height, width, channels = x_best.shape
    rows = tf.range(height)[tf.newaxis, :, tf.newaxis, tf.newaxis]
    cols = tf.range(width)[tf.newaxis, tf.newaxis, :, tf.newaxis]
    side = square_size(square_fraction(i, n_queries, p_init), height, width)
    u = _square_draws(seed, i + 1, index, 2 + channels)
    top = tf.cast(tf.floor(tf.cast(height - side, tf.float32) * u[:, 0]), tf.int32)
    left = tf.cast(tf.floor(tf.cast(width - side, tf.float32) * u[:, 1]), tf.int32)
    top = top[:, tf.newaxis, tf.newaxis, tf.newaxis]
    left = left[:, tf.newaxis, tf.newaxis, tf.newaxis]
    inside = ((rows >= top) & (rows < top + side)
              & (cols >= left) & (cols < left + side))
    down = tf.reshape(u[:, 2:] < 0.5, [-1, 1, 1, channels])
    return tf.where(inside, tf.where(down, x_low, x_high), x_best)


def square(model_fn, x, y, epsilon, n_queries=5000, p_init=0.8, seed=None,
           index=None):
    """Square Attack (Andriushchenko et al. 2020), L-inf, AutoAttack's version.

    A random search that only reads logits, so a masked gradient does not
    stop it. Start: vertical stripes, ``x + eps * s`` with one random sign per
    example, column and channel. Each of ``n_queries`` iterations draws, per
    example, a square of side ``square_size(square_fraction(i))`` at a random
    position and one random sign per channel, sets the square to ``x_best +-
    2 eps`` projected onto the ball and ``[0, 1]`` (that is, to ``x +- eps``
    clipped to ``[0, 1]``, which is how it is computed), and keeps the
    candidate when it lowers the margin ``z_y - max_{j != y} z_j``. An example
    stops as soon as its margin is <= 0 (misclassified).

    Unlike the reference, which draws one square for the whole batch, every
    example draws its own from ``fold_in(fold_in(seed, i + 1), index)``
    (``index``: the examples' positions in the evaluated set, default
    ``0..B-1``), so an example's result does not depend on its batch. The loop
    ends early once every example is misclassified.

    Returns ``(x_adv, robust)``: the best point found per example (the
    misclassified one where the attack succeeded) and 1.0 where the margin
    stayed positive.
    """
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    _, height, width, channels = x.shape
    batch = tf.shape(x)[0]
    index = (tf.range(batch, dtype=tf.int64) if index is None
             else tf.cast(index, tf.int64))
    seed = make_seed(seed)
    eps = tf.cast(epsilon, x.dtype)

    def margin(x_new):
        return -objectives.margin_loss(y, model_fn(x_new))  # z_y - max other

    stripes = tf.where(_square_draws(seed, 0, index, width * channels) < 0.5, -1.0, 1.0)
    stripes = tf.reshape(tf.cast(stripes, x.dtype), [-1, 1, width, channels])
    x_best = project(x + eps * stripes, x, epsilon)
    best = margin(x_best)
    # x_best lies in the ball, so x_best +- 2 eps projected is x +- eps
    # (clipped to [0, 1]): the candidate only selects between three images.
    x_high, x_low = project(x + eps, x, epsilon), project(x - eps, x, epsilon)

    def body(i, x_best, best):
        x_new = fused(_square_candidate)(i, x_best, x_low, x_high, seed, index,
                                         n_queries, p_init)
        new = margin(x_new)
        take = (new < best) & (best > 0.0)
        x_best = tf.where(take[:, tf.newaxis, tf.newaxis, tf.newaxis], x_new, x_best)
        return i + 1, tf.stop_gradient(x_best), tf.where(take, new, best)

    _, x_best, best = tf.while_loop(
        lambda i, _, best: (i < n_queries) & tf.reduce_any(best > 0.0), body,
        (tf.constant(0), x_best, best), maximum_iterations=n_queries)
    return tf.stop_gradient(x_best), tf.cast(best > 0.0, tf.float32)


# ----------------------------------------------------------------------------
# FAB-T (minimum-norm, targeted)
# ----------------------------------------------------------------------------
FAB_ALPHA_MAX, FAB_ETA, FAB_BETA = 0.1, 1.05, 0.9
#: Bisection iterations of the L-inf projection, by float size in bytes, then
#: :data:`PROJECTION_REFINEMENTS` exact steps on the bracket found. float64:
#: past the mantissa's length (the last bracket is two adjacent floats), the
#: reference for the tests. float32: 16 bisections leave a bracket of width
#: ``max room / 2^16`` that rarely holds a breakpoint, and each refinement
#: step crosses the ones it does hold; 1.5-1.7x faster than 32 bisections, the same
#: step to float32 rounding (BUILD_NOTES.md, "AutoAttack's Square and FAB-T").
PROJECTION_BISECTIONS = {4: 16, 8: 64}
PROJECTION_REFINEMENTS = 2


def project_onto_hyperplane_linf(t, w, b):
    """The smallest L-inf step ``d`` with ``<w, t + d> = b`` and ``t + d`` in ``[0, 1]``.

    Row-wise for ``t, w`` of shape ``[N, D]`` and ``b`` of shape ``[N]`` (FAB's
    projection, Croce & Hein 2020, Prop. 2 with the box). Moving coordinate
    ``i`` by at most ``lam`` towards the side that brings ``<w, .>`` to ``b``
    changes it by ``|w_i| min(lam, p_i)``, ``p_i`` the room left in ``[0, 1]``;
    that sum ``g(lam)`` is continuous, piecewise linear and non-decreasing, so
    the smallest sufficient ``lam`` is found by bisecting its value on ``[0,
    max p]`` (:data:`PROJECTION_BISECTIONS` fixed iterations for the dtype:
    static shapes, no sort) and then solving ``g(lam) = need`` on the last
    bracket piece by piece (:data:`PROJECTION_REFINEMENTS` + 1 linear solves,
    each exact on the piece it starts in). This is the
    reference's answer (which sorts the breakpoints ``p``, ``O(D log D)`` a
    row) at ``O(D)`` work per iteration: 3x faster on a 2-core CPU for 1000
    rows of 784, and closer to a float64 solve (2e-7 against 1e-6).
    When even ``lam = max p`` cannot reach the hyperplane every coordinate
    moves to its bound. Coordinates with ``w_i = 0`` stay.
    """
    dtype = t.dtype
    dot = tf.reduce_sum(w * t, 1)
    side = tf.where(dot - b >= 0, tf.ones_like(b), -tf.ones_like(b))
    w = w * side[:, tf.newaxis]
    need = (dot - b) * side  # >= 0: how far <w, .> must come down
    up = w < 0  # coordinates that move towards 1
    weight = tf.abs(w)
    room = tf.where(up, 1.0 - t, t)
    reachable = need < tf.reduce_sum(weight * room, 1)
    lo = tf.zeros_like(need)
    hi = tf.reduce_max(room, 1)
    for _ in range(PROJECTION_BISECTIONS[8 if dtype.size >= 8 else 4]):
        mid = 0.5 * (lo + hi)
        short = tf.reduce_sum(weight * tf.minimum(mid[:, tf.newaxis], room), 1) < need
        lo = tf.where(short, mid, lo)
        hi = tf.where(short, hi, mid)
    # Exact steps on [lo, hi]: with the coordinates whose room exceeds lam
    # moving by the new lam and the others fully, g is linear and at least
    # the true g beyond lam, so its root never overshoots: lam only grows,
    # and is exact once no breakpoint lies between lam and the root.
    lam = lo
    for _ in range(1 + PROJECTION_REFINEMENTS):
        moving = room > lam[:, tf.newaxis]
        fixed = tf.reduce_sum(tf.where(moving, tf.zeros_like(t), weight * room), 1)
        slope = tf.reduce_sum(tf.where(moving, weight, tf.zeros_like(t)), 1)
        safe = tf.where(slope > 0, slope, tf.ones_like(slope))
        lam = tf.clip_by_value((need - fixed) / safe, lam, hi)
    lam = tf.where(reachable, lam, hi)  # out of reach: every coordinate to its bound
    step = tf.minimum(lam[:, tf.newaxis], room)
    return tf.where(w != 0, tf.where(up, step, -step), tf.zeros_like(t))


def fab_targeted(model_fn, x, y, epsilon, target_rank=1, steps=100,
                 alpha_max=FAB_ALPHA_MAX, eta=FAB_ETA, beta=FAB_BETA):
    """FAB-T (Croce & Hein 2020), L-inf, one run from the clean input.

    The target is the ``target_rank``-th highest-scoring class at ``x`` other
    than the top one (for a correctly classified example: the ``target_rank``-th
    most likely wrong class). Each of ``steps`` iterations linearises
    ``f_t - f_y`` at the iterate, projects both the iterate and ``x`` onto the
    linearised decision boundary (within ``[0, 1]``), moves to the convex
    combination ``(1 - a)(x_k + eta d_k) + a (x + eta d_0)`` with ``a = min(
    |d_k| / (|d_k| + |d_0|), alpha_max)``, and, whenever that point is
    misclassified, records it if it is the closest so far and pulls the
    iterate towards ``x`` by ``beta``. Deterministic (AutoAttack's first
    restart has no random start).

    Returns ``(x_adv, robust)``: the closest misclassified point found where
    it lies within ``epsilon`` (else ``x``), and 1.0 where none does.
    """
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    y = tf.cast(tf.reshape(y, [-1]), tf.int32)
    batch = tf.shape(x)[0]
    features = math.prod(x.shape[1:])  # static, so the projection's loop is too
    x0 = tf.reshape(x, [batch, features])
    order = tf.argsort(model_fn(x), axis=1, direction="DESCENDING", stable=True)
    target = order[:, target_rank]
    pair = tf.stack([y, target], axis=1)

    def gap(logits):  # f_t - f_y, >= 0 once the target beats the label
        picked = tf.gather(tf.cast(logits, x.dtype), pair, batch_dims=1)
        return picked[:, 1] - picked[:, 0]

    def body(i, x1, best_x, best_norm):
        value, grad, logits = input_gradient(model_fn, x1, gap)
        if logits.dtype == tf.float16:  # FAB uses the gradient's size, not its sign
            grad = grad / FLOAT16_INPUT_GRAD_SCALE
        w = tf.reshape(tf.cast(grad, x.dtype), [batch, features])
        flat = tf.reshape(x1, [batch, features])
        b = -value + tf.reduce_sum(w * flat, 1)
        # Two independent clusters, not one over the stacked rows: the graph
        # executor runs them on both cores at once (row-wise, so the same
        # result; 3.9 vs 5.3 ms for 2 x 325 rows of 784, BUILD_NOTES.md).
        project_fn = fused(project_onto_hyperplane_linf)
        d1 = project_fn(flat, w, b)
        d2 = project_fn(x0, w, b)
        a1 = tf.maximum(tf.reduce_max(tf.abs(d1), 1, keepdims=True), 1e-8)
        a2 = tf.maximum(tf.reduce_max(tf.abs(d2), 1, keepdims=True), 1e-8)
        alpha = tf.minimum(tf.maximum(a1 / (a1 + a2), 0.0), alpha_max)
        flat = tf.clip_by_value((flat + eta * d1) * (1.0 - alpha)
                                + (x0 + eta * d2) * alpha, 0.0, 1.0)
        logits = model_fn(tf.reshape(flat, tf.shape(x)))
        wrong = tf.argmax(logits, axis=1, output_type=tf.int32) != y
        norm = tf.reduce_max(tf.abs(flat - x0), 1)
        better = wrong & (norm < best_norm)
        best_x = tf.where(better[:, None], flat, best_x)
        best_norm = tf.where(better, norm, best_norm)
        flat = tf.where(wrong[:, None], x0 + (flat - x0) * beta, flat)
        return (i + 1, tf.stop_gradient(tf.reshape(flat, tf.shape(x))),
                tf.stop_gradient(best_x), best_norm)

    _, _, best_x, best_norm = tf.while_loop(
        lambda i, *_: i < steps, body,
        (tf.constant(0), x, x0, tf.fill([batch], tf.constant(1e10, x.dtype))),
        maximum_iterations=steps)
    broken = best_norm <= tf.cast(epsilon, x.dtype)
    x_adv = tf.where(broken[:, None], best_x, x0)  # beyond epsilon does not count
    return tf.reshape(x_adv, tf.shape(x)), 1.0 - tf.cast(broken, tf.float32)


# ----------------------------------------------------------------------------
# APGD (Croce & Hein 2020) and its DLR losses
# ----------------------------------------------------------------------------
#: APGD defaults (Croce & Hein 2020): step-decrease threshold and momentum.
APGD_RHO = 0.75
APGD_MOMENTUM = 0.75


def _true_logit(labels, logits):
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    return tf.gather(logits, labels, axis=1, batch_dims=1)


def dlr_loss(labels, logits):
    """Per-example untargeted DLR loss ``-(z_y - max_{i!=y} z_i)/(z_1 - z_3)``.

    ``z_1 >= z_2 >= ...`` are the sorted logits (needs >= 3 classes).
    """
    logits = tf.cast(logits, tf.float32)
    top = tf.math.top_k(logits, k=3).values
    margin = -objectives.margin_loss(labels, logits)
    return -margin / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(labels, targets, logits):
    """Per-example targeted DLR ``-(z_y - z_t) / (z_1 - (z_3 + z_4) / 2)``.

    Needs >= 4 classes. Maximising it pushes the target logit ``z_t`` above
    the true one; the denominator makes it invariant to logit scale.
    """
    logits = tf.cast(logits, tf.float32)
    top = tf.math.top_k(logits, k=4).values
    diff = _true_logit(labels, logits) - _true_logit(targets, logits)
    return -diff / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def target_classes(labels, logits, rank):
    """The ``rank``-th (1 = highest) scoring class other than the label."""
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    order = tf.argsort(logits - onehot * 1e9, axis=-1, direction="DESCENDING",
                       stable=True)
    return tf.gather(order, tf.cast(rank, tf.int32) - 1, axis=1)


def apgd_checkpoints(steps):
    """APGD's checkpoints ``w_j = ceil(p_j * steps)`` (Croce & Hein 2020).

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``;
    only the ``w_j`` in ``(0, steps]`` are returned (sorted, no duplicates).
    The ``p_j`` are kept in exact hundredths, so ``0.22 * 100`` is 22, not 23.
    """
    steps = int(steps)
    if steps < 1:
        return []
    hundredths = [0, 22]
    while hundredths[-1] <= 100:
        prev, cur = hundredths[-2], hundredths[-1]
        hundredths.append(cur + max(cur - prev - 3, 6))
    out = []
    for p in hundredths[1:]:
        w = -(-p * steps // 100)  # exact ceil
        if w > steps:
            break
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
    return out


APGDResult = collections.namedtuple(
    "APGDResult", ["x_adv", "robust", "loss_best", "step_size"])


def _apgd_candidate(first, x_adv, x_prev, grad, step, x, eps, momentum):
    """APGD's next iterate: a sign step of the per-example ``step``, then
    momentum (``1`` on the ``first`` step), both projected."""
    a = tf.cast(tf.where(first, 1.0, momentum), x.dtype)
    step = _expand_like(tf.cast(step, x.dtype), x)
    z = project(sign_step(x_adv, grad, step), x, eps)
    return project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)


def _apgd_update(s, x_new, loss_new, grad_new, wrong, check, interval, rho):
    """APGD's state after evaluating ``x_new``: best points, success counts,
    and at a checkpoint (``check``) the step-size halving and restart."""
    pe = lambda v: _expand_like(v, x_new)  # noqa: E731
    x_best_adv = tf.where(pe(wrong), x_new, s["x_best_adv"])
    robust = s["robust"] & ~wrong
    successes = s["successes"] + tf.cast(loss_new > s["loss_prev"], tf.float32)
    improved = loss_new > s["loss_best"]
    x_best = tf.where(pe(improved), x_new, s["x_best"])
    grad_best = tf.where(pe(improved), grad_new, s["grad_best"])
    loss_best = tf.where(improved, loss_new, s["loss_best"])
    cond1 = successes < rho * interval
    cond2 = ~s["reduced_last"] & (loss_best <= s["loss_best_last"])
    halve = check & (cond1 | cond2)
    return dict(
        x_prev=s["x_adv"],
        x_adv=tf.where(pe(halve), x_best, x_new),
        grad=tf.where(pe(halve), grad_best, grad_new),
        loss_prev=tf.where(halve, loss_best, loss_new),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_best_adv=x_best_adv, robust=robust,
        step=tf.where(halve, s["step"] * 0.5, s["step"]),
        successes=tf.where(check, tf.zeros_like(successes), successes),
        loss_best_last=tf.where(check, loss_best, s["loss_best_last"]),
        reduced_last=tf.where(check, halve, s["reduced_last"]))


def apgd(model_fn, x, y, epsilon, steps=100, loss="ce", targets=None,
         seed=None, *, rho=APGD_RHO, momentum=APGD_MOMENTUM, init_noise=None):
    """Auto-PGD, L-inf (Croce & Hein 2020, Algorithm 1), per-example state.

    Starts at ``project(x + U(-eps, eps))`` (or ``x + init_noise``) with step
    size ``2 * eps``. Each step is a sign step followed by momentum ``alpha =
    momentum`` (1 on the first step), both projected. At every checkpoint
    ``w_j`` (:func:`apgd_checkpoints`) an example's step size is halved, and it
    restarts from its best point, if (1) fewer than ``rho * (w_j - w_{j-1})``
    of its steps since the last checkpoint increased the loss, or (2) its step
    size was not halved at the last checkpoint and its best loss has not
    increased since then.

    Choices where the paper and the reference code (fra31/auto-attack)
    differ, following the paper: checkpoints are ``ceil(p_j * steps)``
    (identical to the code's integer schedule for 100 steps); condition (2)
    is already active at the first checkpoint (the code disables it there);
    after a restart the next step's success is judged against the best loss
    (the point it restarted from). The start is uniform in the eps-ball (the
    code rescales the noise so its largest entry is exactly eps).

    ``loss`` is ``"ce"``, ``"dlr"`` or ``"dlr_targeted"`` (needs ``targets``,
    one class per example). Returns :class:`APGDResult`: ``x_adv`` is the
    last misclassified iterate where one occurred, else the highest-loss
    point; ``robust`` is 1.0 where no iterate (the start included) was
    misclassified; ``loss_best`` and the final per-example ``step_size``.
    ``steps`` must be a Python int.
    """
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    y = tf.reshape(tf.convert_to_tensor(y), [-1])
    if loss == "ce":
        loss_fn = lambda z: objectives.cross_entropy(y, z)  # noqa: E731
    elif loss == "dlr":
        loss_fn = lambda z: dlr_loss(y, z)  # noqa: E731
    elif loss == "dlr_targeted":
        if targets is None:
            raise ValueError("loss='dlr_targeted' needs targets")
        targets = tf.reshape(tf.convert_to_tensor(targets), [-1])
        loss_fn = lambda z: dlr_targeted_loss(y, targets, z)  # noqa: E731
    else:
        raise ValueError(f"loss must be 'ce', 'dlr' or 'dlr_targeted', got {loss!r}")
    steps = int(steps)
    eps = tf.cast(epsilon, x.dtype)

    # Static schedule: is_check[t] after t steps, interval[t] = w_j - w_{j-1}.
    is_check = np.zeros(steps + 1, bool)
    interval = np.ones(steps + 1, np.float32)
    last = 0
    for w in apgd_checkpoints(steps):
        is_check[w], interval[w], last = True, w - last, w
    is_check = tf.constant(is_check)
    interval = tf.constant(interval)

    if init_noise is None:
        init_noise = uniform_noise(tf.shape(x), eps, seed, x.dtype)
    x0 = project(x + tf.cast(init_noise, x.dtype), x, eps)
    loss0, grad0, logits0 = input_gradient(model_fn, x0, loss_fn)
    robust0 = objectives.correct(y, logits0) > 0.5
    batch = tf.shape(x)[0]
    zeros = tf.zeros([batch], tf.float32)
    state = dict(
        x_adv=x0, x_prev=x0, grad=grad0, loss_prev=loss0,
        x_best=x0, grad_best=grad0, loss_best=loss0,
        x_best_adv=x0, robust=robust0,
        step=tf.fill([batch], 2.0 * tf.cast(eps, tf.float32)),
        successes=zeros, loss_best_last=loss0,
        reduced_last=tf.zeros([batch], tf.bool))
    if steps <= 0:
        return _apgd_result(state, x)

    def body(i, s):
        x_new = fused(_apgd_candidate)(tf.equal(i, 0), s["x_adv"], s["x_prev"],
                                       s["grad"], s["step"], x, eps, momentum)
        loss_new, grad_new, logits = input_gradient(model_fn, x_new, loss_fn)
        wrong = objectives.correct(y, logits) < 0.5
        t = i + 1
        new = fused(_apgd_update)(s, x_new, loss_new, grad_new, wrong,
                                  is_check[t], interval[t], rho)
        return t, {k: tf.stop_gradient(v) for k, v in new.items()}

    _, state = tf.while_loop(lambda i, _: i < steps, body,
                             (tf.constant(0), state), maximum_iterations=steps)
    return _apgd_result(state, x)


def _apgd_result(s, x):
    x_adv = tf.where(_expand_like(s["robust"], x), s["x_best"], s["x_best_adv"])
    return APGDResult(tf.stop_gradient(x_adv),
                      tf.cast(s["robust"], tf.float32), s["loss_best"], s["step"])
