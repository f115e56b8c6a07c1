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


# Epsilon and step sizes are in pixel units for inputs in [0, 1]: a budget above
# 1 cannot constrain anything and almost always means "8" was given for 8/255.
MAX_EPSILON = 1.0


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
        check_real("epsilon", self.epsilon, low=0.0, high=MAX_EPSILON)
        check_real("step_size", self.step_size, low=0.0, high=MAX_EPSILON)
        check_int("steps", self.steps, low=0, high=100_000)
        check_real("gamma", self.gamma, low=0.0, high=1e6)
        check_real("beta", self.beta, low=0.0, high=1e6)
        return self


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
