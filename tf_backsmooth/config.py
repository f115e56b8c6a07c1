"""Frozen configuration records and the validation shared by every entry point.

This module sits at the top of the one-way dependency chain
(``config -> attacks/objectives -> methods -> robust_model -> train_lib -> bin``)
and imports neither TensorFlow nor absl, so a bad value is rejected before any
heavy import or any work starts.

Every check raises :class:`ConfigError` (a ``ValueError``) whose message names
the offending parameter and the value it got.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the parameter."""


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value, *, low=None, high=None, low_open=False,
               high_open=False, allow_none=False):
    """Returns ``float(value)`` after checking it is finite and in range.

    ``low``/``high`` bound the value (inclusive unless ``*_open``).
    """
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} is required (got None)")
    if isinstance(value, (str, bytes, bool)):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    if not _is_real(value):
        # Accept 0-d numpy / tensor-like numbers.
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name} must be a real number, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        op = ">" if low_open else ">="
        raise ConfigError(f"{name} must be {op} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        op = "<" if high_open else "<="
        raise ConfigError(f"{name} must be {op} {high}, got {value!r}")
    return value


def check_int(name: str, value, *, low=None, high=None, allow_none=False):
    """Returns ``int(value)`` after checking it is an integer in range."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} is required (got None)")
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif _is_real(value) and float(value).is_integer():
        value = int(value)
    else:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {high}, got {value!r}")
    return value


def check_choice(name: str, value, choices):
    """Checks ``value`` is one of ``choices``; the error lists them."""
    if value not in choices:
        raise ConfigError(
            f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


# Training-attack accuracy minus PGD accuracy above which a run is called failed
# (catastrophic overfitting / gradient masking); see docs/GUIDE.md, "Lessons learned".
FAILURE_GAP = 0.2

# Epsilon and step sizes are in pixel units for inputs in [0, 1]: a budget above
# 1 cannot constrain anything and almost always means "8" was given for 8/255.
MAX_EPSILON = 1.0


def check_epsilon(value, name="epsilon", *, allow_zero=False, allow_none=False):
    """The range check of every attack budget: ``float(value)`` in
    ``(0, MAX_EPSILON]`` (``[0, MAX_EPSILON]`` with ``allow_zero``), pixel
    units. Raises ConfigError naming ``name``."""
    return check_real(name, value, low=0.0, low_open=not allow_zero,
                      high=MAX_EPSILON, allow_none=allow_none)


@dataclasses.dataclass(frozen=True)
class AttackParams:
    """Validated hyper-parameters handed to a method's attack and objective.

    ``epsilon``/``step_size`` are L-infinity budgets in pixel units
    (inputs in [0, 1]); ``extra`` holds method-specific keywords
    (``random_start``, ``lambda_``, ...), already validated by the method.
    """

    epsilon: float = 0.0
    step_size: float = 0.0
    steps: int = 0
    gamma: float = 1.0
    beta: float = 6.0
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def get(self, key, default=None):
        return self.extra.get(key, default)

    def validate(self):
        check_epsilon(self.epsilon, allow_zero=True)
        check_real("step_size", self.step_size, low=0.0, high=MAX_EPSILON)
        check_int("steps", self.steps, low=0, high=100_000)
        check_real("gamma", self.gamma, low=0.0, high=1e6)
        check_real("beta", self.beta, low=0.0, high=1e6)
        return self


def check_lr_boundaries(boundaries, epochs, schedule="piecewise"):
    """Returns ``boundaries`` as a tuple of floats after checking they are
    strictly increasing epochs inside (0, epochs) of a piecewise schedule."""
    if boundaries is None:
        return ()
    if isinstance(boundaries, (str, bytes)) or not isinstance(
            boundaries, (list, tuple)):
        raise ConfigError("lr_boundaries must be a list of epochs, got "
                          f"{boundaries!r}")
    out = tuple(check_real("lr_boundaries", b, low=0.0, low_open=True,
                           high=float(epochs), high_open=True)
                for b in boundaries)
    if any(b >= c for b, c in zip(out, out[1:])):
        raise ConfigError(f"lr_boundaries must be strictly increasing, got "
                          f"{list(out)}")
    if out and schedule != "piecewise":
        raise ConfigError(f"lr_boundaries only applies to lr_schedule="
                          f"'piecewise', not {schedule!r}")
    return out


def as_dict(record) -> dict:
    """A JSON-friendly dict of a (possibly nested) config dataclass."""
    out = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if dataclasses.is_dataclass(value):
            value = as_dict(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


# ----------------------------------------------------------------------------
# A training run
# ----------------------------------------------------------------------------
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")
SPLITS = ("train", "validation", "test")
MODELS = ("small_cnn", "mnist_cnn", "madry_cnn", "mlp", "preact_resnet18", "resnet18",
          "wide_resnet")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "piecewise", "cyclic", "cosine")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
DTYPE_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
INITS = ("keras", "torch")
CO_RULES = ("drop_and_gap", "drop", "gap", "floor_and_gap")
CO_POLICIES = ("shrink_step", "switch_method")
# What --failure_restarts measures PGD accuracy on: the validation split, or a
# fixed, seeded subset of the training images (no split needed).
FAILURE_KEEP = ("best", "last")
FAILURE_DATA = ("validation", "train")
METHODS = ("natural", "pgd_at", "trades", "fgsm_rs", "fast_trades", "gradalign",
           "n_fgsm", "backward_smoothing")


@dataclasses.dataclass(frozen=True)
class COGuardDefaults:
    """The defaults of the catastrophic-overfitting guard: the one table read
    by ``co_guard.COGuard``'s constructor and by the ``co_guard_*`` fields of
    :class:`TrainConfig` (hence ``bin/train``'s flags). 128 examples every 200
    steps with PGD-10 cost 2.75 % extra gradient evaluations for FGSM-RS at
    batch 128 (docs/CO_GUARD.md). Its values are those of :data:`CO_GUARD`."""

    # The measurement: PGD-k and FGSM accuracy on a fixed training subset.
    every_steps: int
    examples: int
    pgd_steps: int
    # The collapse rule (co_guard.collapse_detected) over the last `window`.
    rule: str
    drop: float
    gap: float
    floor: float
    window: int
    # What a collapse does after the rollback.
    policy: str
    factor: float
    fallback: str
    max_collapses: int


#: The CO guard's defaults (the only COGuardDefaults).
CO_GUARD = COGuardDefaults(
    every_steps=200, examples=128, pgd_steps=10,
    rule="drop_and_gap", drop=0.2, gap=0.2, floor=0.05, window=5,
    policy="shrink_step", factor=0.5, fallback="backward_smoothing", max_collapses=3)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one ``bin/train`` run needs; validated on construction.

    Attack values left ``None`` take the method's reference default
    (``methods.resolve_params`` fills them in and checks them again).
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    validation_size: int | None = None
    num_train_examples: int | None = None
    model: str = "small_cnn"
    normalize: bool = True
    init: str = "keras"
    method: str = "backward_smoothing"
    epsilon: float | None = 0.1
    epsilon_warmup_epochs: float = 0.0
    step_size: float | None = None
    steps: int | None = None
    gamma: float | None = None
    beta: float | None = None
    method_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    lr_schedule: str = "piecewise"
    # Epochs (floats) at which "piecewise" divides the learning rate by 10;
    # empty: at 50 % and 75 % of training (the paper).
    lr_boundaries: tuple = ()
    weight_decay: float = 0.0
    model_dir: str = "runs/default"
    seed: int = 0
    jit_compile: Any = "auto"  # True, False or "auto"
    eval_every: int = 1
    eval_examples: int = 1000
    eval_pgd_steps: int = 10
    test_examples: int | None = None
    test_pgd_steps: int = 20
    test_autoattack_examples: int = 0
    # Robustness against compute: autoattack_lite on the first curve_examples
    # test images every curve_every epochs (and after the last); 0: off.
    curve_every: int = 0
    curve_examples: int = 1000
    strategy: str = "default"
    num_cpu_devices: int = 0
    dtype_policy: str = "float32"
    sync_batchnorm: bool = False
    tensorboard: bool = True
    image_summaries: bool = True
    verbose: int = 1
    overwrite: bool = False
    # Catastrophic-overfitting guard (tf_backsmooth.co_guard).
    co_guard: bool = False
    co_guard_every: int = CO_GUARD.every_steps
    co_guard_examples: int = CO_GUARD.examples
    co_guard_pgd_steps: int = CO_GUARD.pgd_steps
    co_guard_rule: str = CO_GUARD.rule
    co_guard_drop: float = CO_GUARD.drop
    co_guard_gap: float = CO_GUARD.gap
    co_guard_floor: float = CO_GUARD.floor
    co_guard_policy: str = CO_GUARD.policy
    co_guard_factor: float = CO_GUARD.factor
    co_guard_fallback: str = CO_GUARD.fallback
    co_guard_max_collapses: int = CO_GUARD.max_collapses
    # Restart with another seed when validation shows a failed run.
    failure_restarts: int = 0
    failure_gap: float = FAILURE_GAP
    # Also judge the epoch that ends the epsilon warm-up, with this gap
    # (1: never, a gap of accuracies cannot exceed 1).
    failure_warmup_gap: float = 1.0
    # A failed attempt's successor starts from the checkpoint at the start of
    # the failed epoch instead of from scratch.
    failure_rollback: bool = False
    # Where the failure check's PGD accuracy comes from ("train": a fixed
    # subset of failure_examples training images, so a recipe without a
    # validation split can restart too), and the first epoch it judges
    # (0: the first epoch at full epsilon; K: epochs K and later only).
    failure_data: str = "validation"
    failure_examples: int = 1000
    failure_from_epoch: int = 0
    # failure_data="train": the PGD steps of the check's own attack (0: as
    # many as eval_pgd_steps). PGD-10 (step 2.5 eps / 10) missed
    # a partial collapse that PGD-20 and the final NOT ROBUST check saw.
    failure_pgd_steps: int = 0
    # failure_data="train": also run autoattack_lite on the check's images and
    # fail an attempt whose PGD accuracy there exceeds it by more than this
    # (gradient masking that PGD does not see). 1: off.
    failure_overestimate_gap: float = 1.0
    # When every attempt fails the check: export the attempt whose weights
    # score best on the check's own attack and images ("best"),
    # or the last attempt as before ("last").
    failure_keep: str = "best"

    def __post_init__(self):
        self._check_run()
        self._check_health()
        if self.co_guard and self.method == "natural":
            raise ConfigError("co_guard needs an adversarial method, not "
                              "'natural'")
        if self.num_cpu_devices and self.strategy != "mirrored":
            raise ConfigError("num_cpu_devices only applies to "
                              "--strategy=mirrored")

    def _check_run(self):
        """Data, model, method, optimisation, evaluation and run fields."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, MODELS)
        check_choice("init", self.init, INITS)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be a bool, got {self.normalize!r}")
        check_choice("method", self.method, METHODS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        object.__setattr__(self, "lr_boundaries", check_lr_boundaries(
            self.lr_boundaries, self.epochs, self.lr_schedule))
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("dtype_policy", self.dtype_policy, DTYPE_POLICIES)
        check_choice("jit_compile", self.jit_compile, (True, False, "auto"))
        check_int("validation_size", self.validation_size, low=0, allow_none=True)
        check_int("num_train_examples", self.num_train_examples, low=1,
                  allow_none=True)
        check_int("epochs", self.epochs, low=1, high=100_000)
        check_real("epsilon_warmup_epochs", self.epsilon_warmup_epochs,
                   low=0.0, high=float(self.epochs))
        if self.epsilon_warmup_epochs and self.method == "natural":
            raise ConfigError("epsilon_warmup_epochs needs an adversarial "
                              "method, not 'natural'")
        check_int("batch_size", self.batch_size, low=1, high=1_000_000)
        check_real("lr", self.lr, low=0.0, low_open=True, high=100.0)
        check_real("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_real("weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_int("seed", self.seed, low=0, high=2**31 - 1)
        check_int("eval_every", self.eval_every, low=0)
        check_int("eval_examples", self.eval_examples, low=1)
        check_int("eval_pgd_steps", self.eval_pgd_steps, low=1)
        check_int("test_examples", self.test_examples, low=1, allow_none=True)
        check_int("test_pgd_steps", self.test_pgd_steps, low=1)
        check_int("test_autoattack_examples", self.test_autoattack_examples, low=0)
        check_int("curve_every", self.curve_every, low=0)
        check_int("curve_examples", self.curve_examples, low=1)
        check_int("num_cpu_devices", self.num_cpu_devices, low=0, high=64)
        check_int("verbose", self.verbose, low=0, high=2)
        if not self.model_dir:
            raise ConfigError("model_dir must not be empty")
        if self.method == "natural":
            if any(v is not None for v in (self.step_size, self.steps)):
                raise ConfigError("method 'natural' runs no attack; do not set "
                                  "step_size or steps")
        else:
            check_epsilon(self.epsilon)
        check_real("step_size", self.step_size, low=0.0, low_open=True,
                   high=MAX_EPSILON, allow_none=True)
        check_int("steps", self.steps, low=1, high=100_000, allow_none=True)
        check_real("gamma", self.gamma, low=0.0, allow_none=True)
        check_real("beta", self.beta, low=0.0, allow_none=True)
    def _check_health(self):
        """The co_guard_* and failure_* fields, and how they fit the rest."""
        check_int("co_guard_every", self.co_guard_every, low=1)
        check_int("co_guard_examples", self.co_guard_examples, low=1)
        check_int("co_guard_pgd_steps", self.co_guard_pgd_steps, low=1)
        check_choice("co_guard_rule", self.co_guard_rule, CO_RULES)
        check_real("co_guard_drop", self.co_guard_drop, low=0.0, high=1.0)
        check_real("co_guard_gap", self.co_guard_gap, low=0.0, high=1.0)
        check_real("co_guard_floor", self.co_guard_floor, low=0.0, high=1.0)
        check_choice("co_guard_policy", self.co_guard_policy, CO_POLICIES)
        check_real("co_guard_factor", self.co_guard_factor, low=0.0,
                   low_open=True, high=1.0, high_open=True)
        check_choice("co_guard_fallback", self.co_guard_fallback, METHODS)
        check_int("co_guard_max_collapses", self.co_guard_max_collapses, low=1)
        check_int("failure_restarts", self.failure_restarts, low=0, high=10)
        check_real("failure_gap", self.failure_gap, low=0.0, high=1.0)
        check_real("failure_warmup_gap", self.failure_warmup_gap, low=0.0,
                   high=1.0)
        if self.failure_warmup_gap < 1.0 and not (
                self.failure_restarts and self.epsilon_warmup_epochs):
            raise ConfigError("failure_warmup_gap below 1 needs failure_restarts > 0 "
                              "and an epsilon warm-up (epsilon_warmup_epochs > 0)")
        if not isinstance(self.failure_rollback, bool):
            raise ConfigError(f"failure_rollback must be a bool, got "
                              f"{self.failure_rollback!r}")
        if self.failure_rollback and not self.failure_restarts:
            raise ConfigError("failure_rollback needs failure_restarts > 0")
        check_choice("failure_data", self.failure_data, FAILURE_DATA)
        check_int("failure_examples", self.failure_examples, low=1)
        check_int("failure_from_epoch", self.failure_from_epoch, low=0)
        check_int("failure_pgd_steps", self.failure_pgd_steps, low=0)
        check_choice("failure_keep", self.failure_keep, FAILURE_KEEP)
        if self.failure_keep != "best" and not self.failure_restarts:
            raise ConfigError(f"failure_keep={self.failure_keep!r} chooses among restarted "
                              "attempts: it needs failure_restarts > 0")
        if self.failure_pgd_steps and self.failure_data != "train":
            raise ConfigError("failure_pgd_steps sets the attack of --failure_data=train; with "
                              "failure_data=validation the check reads the robust validation "
                              "accuracy, whose attack is set by --eval_pgd_steps")
        check_real("failure_overestimate_gap", self.failure_overestimate_gap, low=0.0,
                   high=1.0)
        if self.failure_overestimate_gap < 1.0 and not (
                self.failure_restarts and self.failure_data == "train"):
            raise ConfigError(
                f"failure_overestimate_gap={self.failure_overestimate_gap} compares PGD with "
                "autoattack_lite on the failure check's own training images: it needs "
                "failure_restarts > 0 and failure_data=train (to turn the check off, e.g. "
                "--failure_restarts=0 after a flagfile that sets it, add "
                "--failure_overestimate_gap=1)")
        if self.failure_from_epoch > self.epochs:
            raise ConfigError(f"failure_from_epoch={self.failure_from_epoch} is after the "
                              f"last epoch (epochs={self.epochs}): no epoch would be judged")
        if self.failure_restarts and self.method == "natural":
            raise ConfigError("failure_restarts needs an adversarial method, not 'natural'")
        if (self.failure_restarts and self.failure_data == "validation"
                and not (self.eval_every and self.validation_size != 0)):
            raise ConfigError("failure_restarts with failure_data=validation needs robust "
                              "validation (eval_every > 0 and a validation split); "
                              "without a validation split use --failure_data=train")


# ----------------------------------------------------------------------------
# An evaluation run (bin/evaluate)
# ----------------------------------------------------------------------------
def parse_epsilons(value):
    """``"0.1,8/255"`` (or a number, or a sequence of numbers) -> a tuple of
    distinct budgets, each checked by :func:`check_epsilon`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError("epsilon is required (e.g. --epsilon=0.3 or 0.1,0.2,0.3)")
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    values = []
    for item in items:
        try:
            if isinstance(item, str) and "/" in item:
                num, den = item.split("/")
                number = float(num) / float(den)
            else:
                number = float(item)
        except (TypeError, ValueError, ZeroDivisionError):
            raise ConfigError(f"epsilon: {item!r} is not a number or fraction "
                              f"(got --epsilon={value})") from None
        try:
            check_epsilon(number)
        except ConfigError:
            raise ConfigError(f"epsilon: {item!r} must be in (0, {MAX_EPSILON:g}] "
                              "(pixel units)") from None
        if number in values:
            raise ConfigError(f"epsilon: {item!r} is listed twice")
        values.append(number)
    return tuple(values)


def _check_model_path(value):
    if not value:
        raise ConfigError("model_path is required (a .keras file or a run directory)")
    path = Path(value)
    if path.is_dir():
        if not (path / "model.keras").is_file():
            raise ConfigError(f"model_path={value}: the directory has no model.keras")
    elif not path.exists():
        raise ConfigError(f"model_path={value}: no such file or directory")
    elif path.suffix != ".keras":
        raise ConfigError(f"model_path={value}: not a .keras file or a run directory")


def _check_output_path(name, value, suffix):
    if value is None:
        return
    path = Path(value)
    if not value or path.is_dir():
        raise ConfigError(f"{name}={value} must be a file path")
    if path.suffix.lower() != suffix:
        raise ConfigError(f"{name}={value} must end in {suffix}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{name}={value}: folder {str(parent)!r} does not exist")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything one ``bin/evaluate`` run needs; validated on construction.

    Field names equal ``bin/evaluate``'s flags (``tf_backsmooth.flags.
    define_eval_flags``), so every message names the flag. Besides values, the
    checks look at the file system: ``model_path`` must be a ``.keras`` file or
    a run directory holding ``model.keras``, ``data_dir`` a directory, and the
    folders of ``output`` (``.json``) and ``plot`` (``.png``) must exist.
    ``epsilon`` takes ``"0.1,8/255"``, a number or a sequence and becomes a
    tuple of floats. ``attacks`` (names or presets, a comma-separated string
    or a sequence) is checked against the attack list by
    ``evaluation.parse_attacks`` when the run starts.
    """

    model_path: str | None = None
    epsilon: Any = None
    dataset: str = "mnist"
    data_dir: str | None = None
    split: str = "test"
    attacks: Any = "pgd"
    pgd_steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    apgd_steps: int = 100
    apgd_targets: int = 9
    square_queries: int = 5000   # AutoAttack's standard version
    fab_steps: int = 100         # AutoAttack's standard version
    num_examples: int | None = None
    batch_size: int = 256
    seed: int = 0
    output: str | None = None
    plot: str | None = None
    progress: bool = True
    jit_compile: bool = False

    def __post_init__(self):
        _check_model_path(self.model_path)
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset={self.dataset}: unknown dataset; valid: "
                              + ", ".join(sorted(DATASETS)))
        if self.split not in SPLITS:
            raise ConfigError(f"split={self.split}: valid splits are " + ", ".join(SPLITS))
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError(f"data_dir={self.data_dir}: no such directory")
        object.__setattr__(self, "epsilon", parse_epsilons(self.epsilon))
        names = (self.attacks.split(",") if isinstance(self.attacks, str)
                 else list(self.attacks or ()))
        if not [a for a in names if str(a).strip()]:
            raise ConfigError("attacks: no attack given")
        for name in ("pgd_steps", "restarts", "apgd_steps", "apgd_targets",
                     "square_queries", "fab_steps", "batch_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("num_examples", self.num_examples, low=1, allow_none=True)
        check_int("seed", self.seed, low=0)
        check_real("step_size", self.step_size, low=0.0, low_open=True,
                   high=MAX_EPSILON, allow_none=True)
        _check_output_path("output", self.output, ".json")
        _check_output_path("plot", self.plot, ".png")
        for name in ("progress", "jit_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
