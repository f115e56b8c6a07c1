"""Which CPU kernels TensorFlow runs, chosen per CPU kind before TensorFlow starts.

TensorFlow's x86 Linux wheels carry two kernel libraries for convolutions and
matrix products: oneDNN's and Eigen's. TensorFlow turns oneDNN on by default
only on CPUs with AVX-512 VNNI, AVX-512 BF16, AVX-VNNI or AMX
(``DefaultOneDnnPolicy`` in ``tensorflow/core/util/util.cc``); every other
x86 CPU, among them every AVX2-only one (AMD Zen 2/3 servers, many laptops),
gets Eigen unless ``TF_ENABLE_ONEDNN_OPTS=1`` is set before TensorFlow loads.
On such a CPU our Backward Smoothing step is 1.5-1.9x faster with oneDNN
(:data:`ONEDNN_EVIDENCE`), so :func:`choose` sets the variable there.

Rules, in order (:func:`decide_onednn`):

1. ``TF_ENABLE_ONEDNN_OPTS`` already in the environment: the user's setting
   wins, whatever it is.
2. Not Linux on x86-64, or ``/proc/cpuinfo`` unreadable: TensorFlow's default
   (nothing measured there).
3. The CPU has one of :data:`TF_ONEDNN_FLAGS`: TensorFlow already turns
   oneDNN on; nothing to do.
4. The CPU has AVX2 and FMA: oneDNN on (set by this module; measured).
5. Otherwise (AVX or older): TensorFlow's default (Eigen; not measured).

:func:`choose` runs once when ``tf_backsmooth`` is imported, and again (a
no-op then) from ``bin/train`` and ``bin/evaluate`` before anything loads
TensorFlow. When TensorFlow was imported first with the slower choice, it
cannot be changed any more in that process: :func:`choose` logs once how to
get the faster one. :func:`describe` is the run manifest's record of it.

``TF_BACKSMOOTH_CPUINFO`` names another file to read the CPU flags from
(default ``/proc/cpuinfo``): the tests and ``bench/vs_pytorch.py
--emulate_avx2`` use it to see the rules act as on another CPU kind.

This module imports nothing heavy (no TensorFlow), so importing it is free.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
from typing import Optional

log = logging.getLogger("tf_backsmooth")

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
CPUINFO_ENV = "TF_BACKSMOOTH_CPUINFO"
#: /proc/cpuinfo flags for which TensorFlow turns oneDNN on by itself.
TF_ONEDNN_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
                   "amx_bf16")
#: bfloat16 units (for ``--dtype_policy=mixed_bfloat16``).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: Flags worth recording in a run manifest (the ISA and the deciding ones).
REPORTED_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                  "amx_tile", "amx_int8", "amx_bf16")
#: The measurement behind rule 4 (BUILD_NOTES.md, "CPU kernels").
ONEDNN_EVIDENCE = ("AVX2 CPUs: the BS step measured 1.5x (SmallCNN batch 128) and 1.9x "
                   "(ResNet-18 batch 32) faster with oneDNN than with TensorFlow's default "
                   "Eigen kernels")
_TRUE = ("1", "true")
_FALSE = ("0", "false")


@dataclasses.dataclass(frozen=True)
class OneDnnChoice:
    """What oneDNN should be in this process, and why.

    ``enabled``: True / False, or None where TensorFlow's own default applies
    and is not known here. ``source``: ``"user"`` (the environment said so),
    ``"tensorflow"`` (TensorFlow's default, left alone) or
    ``"tf_backsmooth"`` (set by :func:`choose`).
    """

    enabled: Optional[bool]
    source: str
    reason: str


def _cpuinfo_field(name, cpuinfo):
    """The value of the first ``name`` line of ``cpuinfo`` (default:
    ``$TF_BACKSMOOTH_CPUINFO`` or ``/proc/cpuinfo``); ``""`` when no line has
    it, None where the file cannot be read (not Linux)."""
    if cpuinfo is None:
        cpuinfo = os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo"
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[-1].strip()
    except OSError:
        return None
    return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> Optional[frozenset]:
    """The CPU's first ``flags`` line as a set (see :func:`_cpuinfo_field`);
    None where unknown."""
    value = _cpuinfo_field("flags", cpuinfo)
    return None if value is None else frozenset(value.split())


def cpu_model(cpuinfo: Optional[str] = None) -> Optional[str]:
    """The CPU's first ``model name``, e.g. ``"AMD EPYC"``; None where unknown."""
    return _cpuinfo_field("model name", cpuinfo) or None


def isa(flags) -> str:
    """The CPU's widest vector ISA: ``"AMX"``, ``"AVX-512"``, ``"AVX2"``,
    ``"AVX"``, ``"SSE"``, or ``"unknown"`` (no flags)."""
    if flags is None:
        return "unknown"
    for name, flag in (("AMX", "amx_tile"), ("AVX-512", "avx512f"), ("AVX2", "avx2"),
                       ("AVX", "avx")):
        if flag in flags:
            return name
    return "SSE"


def bfloat16_units(flags) -> Optional[list]:
    """The bfloat16 instruction sets among ``flags`` (None: unknown)."""
    return None if flags is None else [u for u in BF16_FLAGS if u in flags]


def _is_x86_linux(system, machine):
    return system == "Linux" and machine.lower() in ("x86_64", "amd64")


def decide_onednn(environ, flags, system=None, machine=None) -> OneDnnChoice:
    """The rules of the module docstring, for given facts (pure; tested)."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if ONEDNN_ENV in environ:
        value = environ[ONEDNN_ENV].strip().lower()
        enabled = True if value in _TRUE else False if value in _FALSE else None
        return OneDnnChoice(enabled, "user", f"{ONEDNN_ENV}={environ[ONEDNN_ENV]} was set "
                            "before tf_backsmooth was imported")
    if not _is_x86_linux(system, machine) or flags is None:
        return OneDnnChoice(None, "tensorflow",
                            f"not measured on {system} {machine}: TensorFlow's default")
    present = [f for f in TF_ONEDNN_FLAGS if f in flags]
    if present:
        return OneDnnChoice(True, "tensorflow",
                            f"the CPU has {', '.join(present)}: TensorFlow turns oneDNN on")
    if "avx2" in flags and "fma" in flags:
        return OneDnnChoice(True, "tf_backsmooth",
                            f"AVX2 CPU without {'/'.join(TF_ONEDNN_FLAGS[:3])} or AMX, where "
                            f"TensorFlow leaves oneDNN off; {ONEDNN_EVIDENCE}")
    return OneDnnChoice(False, "tensorflow",
                        f"{isa(flags)} CPU without AVX2: TensorFlow's default (Eigen kernels); "
                        "oneDNN not measured here")


_CHOICE: Optional[OneDnnChoice] = None
_WARNED = False


def onednn_in_use() -> Optional[bool]:
    """Whether the TensorFlow loaded in this process uses oneDNN (None: not
    loaded yet, or unknown)."""
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # private API moved: unknown
        return None


def choose(environ=None) -> OneDnnChoice:
    """Applies :func:`decide_onednn` to this process (once; later calls
    return the first choice). Sets ``TF_ENABLE_ONEDNN_OPTS=1`` when rule 4
    holds and TensorFlow is not loaded yet; when it is loaded already with
    oneDNN off, logs once how to get it on."""
    global _CHOICE, _WARNED
    if _CHOICE is not None:
        return _CHOICE
    environ = os.environ if environ is None else environ
    choice = decide_onednn(environ, cpu_flags())
    if choice.source == "tf_backsmooth":
        if "tensorflow" in sys.modules:
            if onednn_in_use() is False and not _WARNED:
                _WARNED = True
                log.warning(
                    "TensorFlow was imported before tf_backsmooth and runs without oneDNN on "
                    "this AVX2 CPU; the training step is about 1.5-1.9x faster with it: set "
                    "%s=1 in the environment, or import tf_backsmooth before TensorFlow",
                    ONEDNN_ENV)
            choice = dataclasses.replace(
                choice, enabled=onednn_in_use(), source="tensorflow",
                reason="TensorFlow was loaded before tf_backsmooth could choose")
        else:
            environ[ONEDNN_ENV] = "1"
    _CHOICE = choice
    return choice


def describe() -> dict:
    """The run manifest's record: CPU kind, deciding flags, the choice, and
    what the loaded TensorFlow actually uses."""
    flags = cpu_flags()
    choice = choose()
    return {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        "isa": isa(flags),
        "flags": None if flags is None else [f for f in REPORTED_FLAGS if f in flags],
        "onednn": {"chosen": choice.enabled, "by": choice.source, "reason": choice.reason,
                   "in_use": onednn_in_use()},
    }


def summary() -> str:
    """One log line: ``CPU AVX2; oneDNN on (tf_backsmooth: ...)``."""
    info = describe()
    used = info["onednn"]["in_use"]
    state = {True: "on", False: "off", None: "unknown"}[used]
    return (f"CPU {info['isa']}; oneDNN kernels {state} "
            f"({info['onednn']['by']}: {info['onednn']['reason']})")


def bfloat16_warning(dtype_policy, units, accelerator):
    """A warning (or None) for ``mixed_bfloat16`` on a CPU that reports no
    bfloat16 units (``units == []``; None = unknown: no warning)."""
    if dtype_policy != "mixed_bfloat16" or accelerator is not None or units != []:
        return None
    return ("--dtype_policy=mixed_bfloat16 on a CPU that reports no bfloat16 units "
            f"({' / '.join(BF16_FLAGS)} absent from /proc/cpuinfo): its bfloat16 "
            "matrix products are not native here, so this may train slower than float32 "
            "(the measured 2-2.6x gains were on a CPU with AMX). Time both first: python "
            "bench/vs_pytorch.py --precisions=float32,bfloat16")
