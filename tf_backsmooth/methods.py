"""Registry of robust-training methods: name -> (attack, objective).

A :class:`Method` pairs an attack (how the training adversarial examples are
made) with an objective (which per-example terms are minimised). Adding a
method is one :func:`register` call, its name in ``config.METHODS``, a
flag row in ``flags.TRAIN_FLAGS`` (and ``flags._METHOD_KWARGS``) for each new keyword and a
hand-computed test (BUILD_NOTES.md, "Adding a method / dataset / model /
attack", lists every file; tests fail until the lists agree).

Attack signature::

    attack(model_fn, x, y, params, seed) -> AttackOutput

``model_fn`` runs the base model in the method's attack mode (inference unless
the method says otherwise, see ``attack_training``). Objective signature::

    objective(model_fn, x, y, attack_output, params, seed) -> Terms

``model_fn`` runs the base model in training mode inside the gradient tape.
``Terms`` holds per-example vectors; the model reduces ``natural + robust``
with :func:`objectives.replica_mean` (the only reduction).

Every entry documents its reference defaults and the BatchNorm mode of its
attack. ``attack_training`` may be overridden per run with the keyword of the
same name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import tensorflow as tf

from tf_backsmooth import attacks, objectives
from tf_backsmooth.config import AttackParams, ConfigError, check_epsilon, check_int, check_real


@dataclasses.dataclass(frozen=True)
class AttackOutput:
    x_adv: Optional[tf.Tensor]
    # f(x) in the attack's mode when the attack computed it anyway (or None).
    clean_logits: Optional[tf.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Terms:
    """Per-example terms of one training objective."""

    natural: tf.Tensor            # [B] term on clean inputs (0 if none)
    robust: tf.Tensor             # [B] adversarial / regularisation term
    clean_logits: Optional[tf.Tensor] = None  # training-mode f(x), if computed
    adv_logits: Optional[tf.Tensor] = None    # training-mode f(x_adv), if any


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    attack: Optional[Callable[..., AttackOutput]]
    objective: Callable[..., Terms]
    # Gradient evaluations (forward+backward passes) per example per step,
    # attack + objective, used for cost reporting.
    grad_evals: Callable[[AttackParams], int]
    reference: str
    # Whether the attack runs the model in training mode (default: inference).
    attack_training: bool = False
    # Default step size as a function of epsilon (None: no attack).
    default_step_size: Optional[Callable[[float], float]] = None
    default_steps: int = 1
    # Method-specific keywords and their defaults (validated by `check`); with
    # `attack_training` they are the keywords the method accepts (`keywords`).
    extra_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    single_step: bool = False
    # Whether the objective computes training-mode f(x) (so clean accuracy
    # costs nothing extra).
    clean_in_objective: bool = False
    check: Optional[Callable[[Mapping[str, Any]], None]] = None

    @property
    def keywords(self) -> dict:
        """Every keyword the method accepts, with its default: its
        ``extra_defaults`` and ``attack_training``."""
        accepted = dict(self.extra_defaults)
        accepted.setdefault("attack_training", self.attack_training)
        return accepted


_REGISTRY: dict = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def names():
    return sorted(_REGISTRY)


def keyword_names():
    """Every method-specific keyword of every registered method (what
    ``resolve_params`` accepts beyond epsilon, step_size, steps, gamma, beta)."""
    return sorted({k for method in _REGISTRY.values() for k in method.keywords})


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; valid methods: {', '.join(names())}"
        ) from None


def resolve_params(name, epsilon=None, step_size=None, steps=None, gamma=None,
                   beta=None, **extra) -> AttackParams:
    """Validated :class:`AttackParams` for ``name``, defaults filled in.

    Raises :class:`ConfigError` (a ``ValueError``) naming the bad parameter:
    non-finite or out-of-range values, an unknown keyword, attack parameters
    given to ``natural``, or ``steps != 1`` for a single-step method.
    """
    method = get(name)
    allowed = method.keywords
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method {name!r} got unknown keyword(s) {unknown}; it accepts "
            f"{sorted(allowed) or 'none'}")
    merged = {**allowed, **extra}
    if not isinstance(merged["attack_training"], bool):
        raise ConfigError(
            f"attack_training must be a bool, got {merged['attack_training']!r}")
    if method.check is not None:
        method.check(merged)
    gamma = check_real("gamma", 1.0 if gamma is None else gamma, low=0.0)
    beta = check_real("beta", 6.0 if beta is None else beta, low=0.0)
    if method.attack is None:
        given = {k: v for k, v in (("epsilon", epsilon), ("step_size", step_size),
                                   ("steps", steps)) if v not in (None, 0)}
        if given:
            raise ConfigError(
                f"method {name!r} runs no attack; do not set {sorted(given)}")
        return AttackParams(0.0, 0.0, 0, gamma, beta, merged).validate()
    if epsilon is None:
        raise ConfigError(f"epsilon is required for method {name!r}")
    epsilon = check_epsilon(epsilon)
    if steps is None:
        steps = method.default_steps
    steps = check_int("steps", steps, low=1 if not method.single_step else 0)
    if method.single_step and steps != 1:
        raise ConfigError(
            f"steps must be 1 for the single-step method {name!r}, got {steps}")
    if step_size is None:
        step_size = method.default_step_size(epsilon)
    step_size = check_real("step_size", step_size, low=0.0, low_open=True,
                           high=1.0)
    return AttackParams(epsilon, step_size, steps, gamma, beta,
                        merged).validate()


def _check_lambda(extra):
    check_real("lambda_", extra["lambda_"], low=0.0)


def _check_fgsm_start(extra):
    """The FGSM family's random start: ``init_scale`` (its radius in units of
    epsilon) and, where the method has it, ``clip_start``."""
    check_real("init_scale", extra["init_scale"], low=0.0, high=10.0)
    if not isinstance(extra.get("clip_start", True), bool):
        raise ConfigError(
            f"clip_start must be a bool, got {extra['clip_start']!r}")


# ----------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------
def forward_pair(model_fn, a, b):
    """``(f(a), f(b))``, as one batched call when that is exact.

    ``model_fn.batch_independent`` (set by RobustModel for models without
    BatchNorm or other batch-statistics layers) allows one call on the
    concatenated batch: larger kernels run faster, and every example's output
    is the same as with two calls (dropout draws independent masks either
    way). With BatchNorm the two calls stay separate, as in the references,
    so each pass normalises with its own batch statistics.
    """
    if getattr(model_fn, "batch_independent", False):
        n = tf.shape(a)[0]
        both = model_fn(tf.concat([a, b], axis=0))
        return both[:n], both[n:]
    return model_fn(a), model_fn(b)

def _zeros_like_batch(y):
    return tf.zeros([tf.shape(y)[0]], tf.float32)


def natural_objective(model_fn, x, y, attack_output, params, seed):
    logits = model_fn(x)
    return Terms(objectives.cross_entropy(y, logits), _zeros_like_batch(y),
                 clean_logits=logits)


def adversarial_ce_objective(model_fn, x, y, attack_output, params, seed):
    """CE on the adversarial examples only (PGD-AT, FGSM-RS, N-FGSM)."""
    adv_logits = model_fn(attack_output.x_adv)
    return Terms(_zeros_like_batch(y), objectives.cross_entropy(y, adv_logits),
                 adv_logits=adv_logits)


def trades_objective(model_fn, x, y, attack_output, params, seed):
    """``CE(f(x), y) + beta * KL(softmax(f(x)) || softmax(f(x')))``.

    Both passes in training mode; the KL target ``f(x)`` is not detached, as in
    the TRADES and Backward Smoothing reference code.
    """
    logits, adv_logits = forward_pair(model_fn, x, attack_output.x_adv)
    return Terms(objectives.cross_entropy(y, logits),
                 params.beta * objectives.kl_divergence(logits, adv_logits),
                 clean_logits=logits, adv_logits=adv_logits)


def gradalign_objective(model_fn, x, y, attack_output, params, seed):
    """FGSM CE plus ``lambda_ * (1 - cos(grad_x CE(x), grad_x CE(x + eta)))``.

    As in Andriushchenko & Flammarion (2020): the clean-input gradient is
    detached, the gradient at ``x + eta`` (``eta ~ U(-eps, eps)``) is
    differentiated through (double backprop). Examples with a zero gradient
    contribute 0 (the reference drops them from the mean instead).
    """
    ce = lambda logits: objectives.cross_entropy(y, logits)  # noqa: E731
    _, g1, clean_logits = attacks.input_gradient(model_fn, x, ce)
    g1 = tf.stop_gradient(g1)
    eta = attacks.uniform_noise(tf.shape(x), params.epsilon, seed, x.dtype)
    _, g2, _ = attacks.input_gradient(model_fn, x + eta, ce)
    cos, nonzero = objectives.gradient_cosine(g1, g2)
    reg = params.get("lambda_") * (1.0 - cos) * nonzero
    adv_logits = model_fn(attack_output.x_adv)
    return Terms(_zeros_like_batch(y),
                 objectives.cross_entropy(y, adv_logits) + reg,
                 clean_logits=clean_logits, adv_logits=adv_logits)


# ----------------------------------------------------------------------------
# Attacks (thin adapters from AttackParams to attacks.*)
# ----------------------------------------------------------------------------
def _pgd_attack(model_fn, x, y, params, seed):
    return AttackOutput(attacks.pgd(
        model_fn, x, y, params.epsilon, params.step_size, params.steps,
        loss="ce", random_start=params.get("random_start"), seed=seed))


def _fgsm_attack(model_fn, x, y, params, seed):
    scale = params.get("init_scale", 1.0)
    return AttackOutput(attacks.fgsm(
        model_fn, x, y, params.epsilon, params.step_size,
        random_start=params.get("random_start", True), seed=seed,
        init_radius=scale * params.epsilon,
        to_ball=params.get("project", True),
        clip_start=params.get("clip_start", True)))


def _trades_attack(model_fn, x, y, params, seed):
    clean_logits = model_fn(x)
    x_adv = attacks.trades_kl(model_fn, x, params.epsilon, params.step_size,
                              params.steps, seed=seed, clean_logits=clean_logits,
                              init=params.get("init", "normal"))
    return AttackOutput(x_adv, clean_logits)


def _bs_attack(model_fn, x, y, params, seed):
    x_adv, clean_logits = attacks.backward_smoothing_with_logits(
        model_fn, x, params.epsilon, params.step_size, params.gamma,
        params.steps, seed=seed)
    return AttackOutput(x_adv, clean_logits)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------
def _fgsm_family(name, objective, default_step_size, extra_defaults, **fields):
    """Registers a single-step FGSM-type method: ``_fgsm_attack`` (one signed
    step from the start its ``extra_defaults`` describe), in training mode as
    in the references."""
    return register(Method(
        name=name, attack=_fgsm_attack, objective=objective, attack_training=True,
        default_step_size=default_step_size, single_step=True,
        extra_defaults=extra_defaults, **fields))


register(Method(
    name="natural", attack=None, objective=natural_objective, default_steps=0,
    grad_evals=lambda p: 1, clean_in_objective=True,
    reference="Standard training: CE on clean inputs."))

register(Method(
    name="pgd_at", attack=_pgd_attack, objective=adversarial_ce_objective,
    default_step_size=lambda eps: 2.5 * eps / 10, default_steps=10,
    extra_defaults={"random_start": True}, grad_evals=lambda p: p.steps + 1,
    reference=(
        "Madry et al. 2018. K-step PGD on CE from a uniform start; defaults "
        "steps=10, step_size=2.5*eps/10 (Madry's 2.5*eps/K rule). Attack in "
        "inference mode (Madry's reference model has no BatchNorm; Rice et "
        "al.'s code attacks in training mode: pass attack_training=True).")))

register(Method(
    name="trades", attack=_trades_attack, objective=trades_objective,
    default_step_size=lambda eps: eps / 4, default_steps=10,
    grad_evals=lambda p: p.steps + 1, clean_in_objective=True,
    reference=(
        "Zhang et al. 2019. K sign-ascent steps on KL from x + 0.001*N(0,1); "
        "loss CE + beta*KL. Defaults steps=10, step_size=eps/4 (CIFAR "
        "reference: 0.007 for eps 0.031), beta=6. Attack in inference mode "
        "(model.eval() in the reference).")))

_fgsm_family(
    "fgsm_rs", adversarial_ce_objective, lambda eps: 1.25 * eps,
    {"random_start": True, "init_scale": 1.0, "clip_start": True},
    grad_evals=lambda p: 2, check=_check_fgsm_start,
    reference=(
        "Wong et al. 2020 ('Fast is better than free'). Uniform start in the "
        "eps-ball, one step of 1.25*eps, projected. Attack in training mode, "
        "as in the reference (BatchNorm statistics also update on the attack "
        "pass). clip_start=True projects the start before the gradient pass "
        "(their CIFAR code); clip_start=False takes the gradient at the "
        "unclipped start x + delta (their MNIST code)."))

register(Method(
    name="fast_trades", attack=_trades_attack, objective=trades_objective,
    default_step_size=lambda eps: eps, extra_defaults={"init": "uniform"},
    grad_evals=lambda p: 2, single_step=True, clean_in_objective=True,
    reference=(
        "TRADES with a uniform start in the eps-ball and one KL step of size "
        "eps (the single-step TRADES baseline of the Backward Smoothing "
        "paper). Attack in inference mode.")))

_fgsm_family(
    "gradalign", gradalign_objective, lambda eps: eps,
    {"random_start": False, "init_scale": 1.0, "lambda_": 0.2},
    grad_evals=lambda p: 4, check=lambda e: (_check_lambda(e), _check_fgsm_start(e)),
    clean_in_objective=True,
    reference=(
        "Andriushchenko & Flammarion 2020. FGSM (official defaults: zero "
        "init, step eps; random_start=True gives FGSM-RS) plus lambda_*(1 - "
        "cos) gradient alignment; lambda_=0.2 is the CIFAR-10 eps=8/255 "
        "value, tune per eps. Attack and regulariser in training mode."))

_fgsm_family(
    "n_fgsm", adversarial_ce_objective, lambda eps: eps,
    {"random_start": True, "init_scale": 2.0, "project": False},
    grad_evals=lambda p: 2, check=_check_fgsm_start,
    reference=(
        "de Jorge et al. 2022. Uniform noise of 2*eps (init_scale=2), one "
        "step of eps, no projection onto the eps-ball (only [0, 1]). Attack "
        "in training mode, as in the reference."))

register(Method(
    name="backward_smoothing", attack=_bs_attack, objective=trades_objective,
    default_step_size=lambda eps: eps, grad_evals=lambda p: p.steps + 2,
    clean_in_objective=True,
    reference=(
        "Chen et al. 2020 (arXiv 2010.01278). Backward step of size alpha "
        "towards softmax(f(x) + gamma*u), u ~ U(-1, 1), then `steps` TRADES "
        "steps; loss CE + beta*KL as TRADES. Defaults alpha=eps, gamma=1, "
        "beta=6, steps=1. Attack in inference mode.")))
