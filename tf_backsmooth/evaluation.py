"""Robustness evaluation: white-box L-inf attacks, worst case, sanity checks.

Public API
----------
* :func:`load_classifier` -- a ``.keras`` file or a run directory holding
  ``model.keras``.
* :func:`evaluate` -- clean accuracy, per-attack and worst-case robust
  accuracy for one or more epsilons, timing and sanity warnings, as a dict.
* :func:`robust_accuracy` -- one attack at one epsilon, a float (cheap enough
  for a training callback).
* :func:`sanity_checks` -- warnings about a model or a report that make the
  numbers suspect (probability outputs, gradient masking, inconsistent
  attack strengths).
* :func:`adversarial_examples` -- the perturbed inputs of one attack.
* :func:`apgd` -- Auto-PGD (Croce & Hein 2020) as a pure TF function, and
  :func:`apgd_checkpoints`, its step-size checkpoint schedule (both defined in
  :mod:`tf_backsmooth.attacks` with the DLR losses, and importable from here).

Attacks (``ATTACKS``): ``fgsm``; ``pgd`` (cross-entropy) and ``pgd_margin``
(CW margin), both :func:`tf_backsmooth.attacks.pgd` from a uniform random
start; ``apgd_ce`` (APGD on cross-entropy); ``apgd_t`` (APGD on the targeted
DLR loss, one run per target class, the ``apgd_targets`` highest-scoring
non-true classes at the clean input); ``fab_t`` (FAB-T,
:func:`tf_backsmooth.attacks.fab_targeted`, ``fab_steps`` iterations per
target, the same targets as ``apgd_t``); ``square`` (the gradient-free Square
Attack, :func:`tf_backsmooth.attacks.square`, ``square_queries`` queries,
one run). Presets run their attacks in order, each only on the examples
still robust: ``autoattack_lite`` is ``apgd_ce`` then ``apgd_t``;
``autoattack`` is AutoAttack's standard version (Croce & Hein 2020):
``apgd_ce``, ``apgd_t`` (9 targets), ``fab_t`` (9 targets, 100 iterations),
``square`` (5000 queries); the report lists what each part broke and its
time (``preset_stages``). When ``square`` runs beside
gradient attacks, the examples it breaks that every gradient attack missed
are counted (``square_beyond_gradient``) and, above 1 point, reported as
gradient masking.

An example counts as robust at an epsilon only if it is correctly classified
clean AND every chosen attack failed on it (per-example worst case). Attacks
run only on the examples that are still undecided: clean-misclassified
examples are never attacked, and restarts (PGD and APGD) and APGD-T targets
only see the examples that survived the earlier runs (the host gathers them
into new batches with NumPy; compiled code never uses boolean-mask indexing).
Each example's random start is keyed on ``(seed, attack, target, restart,
example index)``, so results do not depend on the batch size or on which
examples are still being attacked.

Every per-batch attack is one ``tf.function`` with a dynamic batch dimension,
traced once per model and attack configuration (cached while the Keras model
lives) and reused for all epsilons and batches. With ``jit_compile=True``
batches are padded to power-of-two sizes (at most ``batch_size``), so XLA
compiles a handful of shapes instead of one per batch size; in graph mode a
batch is padded by up to ``REUSE_PAD`` (10 %) to a size its function already
ran, since its fused element-wise parts are XLA clusters compiled per shape.

APGD follows the paper where it and the authors' code differ (documented in
:func:`apgd`); ``pgd``/``pgd_margin`` judge the final iterate (as Foolbox and
the Madry et al. code do), APGD any iterate.
"""

from __future__ import annotations

import sys
import time
import weakref
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tf_backsmooth import attacks as attacks_lib
from tf_backsmooth import moved, objectives, rng
from tf_backsmooth.config import EvalConfig, check_epsilon

ATTACKS = ("fgsm", "pgd", "pgd_margin", "apgd_ce", "apgd_t", "fab_t", "square")
# Presets run their attacks in order, each only on the examples still robust.
PRESETS = {"autoattack_lite": ("apgd_ce", "apgd_t"),
           "autoattack": ("apgd_ce", "apgd_t", "fab_t", "square")}

# Fixed per-attack stream ids (rng.EVAL_ATTACKS): an attack's random starts do
# not depend on which other attacks run or in which order.
_STREAM = rng.EVAL_ATTACKS

#: Square Attack queries per example and FAB-T iterations per target
#: (AutoAttack's standard version; also bin/evaluate's defaults).
SQUARE_QUERIES = EvalConfig.square_queries
FAB_STEPS = EvalConfig.fab_steps

# Attacks that follow the input gradient (Square only reads logits).
_GRADIENT_ATTACKS = ("fgsm", "pgd", "pgd_margin", "apgd_ce", "apgd_t", "fab_t",
                     "autoattack_lite")

#: Sanity checks: accuracy differences below this (1 point) are noise.
TOLERANCE = 0.01

# (weaker, stronger) attack pairs: the stronger should not score higher.
_STRENGTH_ORDER = (("fgsm", "pgd"), ("fgsm", "pgd_margin"), ("pgd", "apgd_ce"),
                   ("pgd_margin", "apgd_t"), ("pgd", "autoattack_lite"),
                   ("autoattack_lite", "autoattack"))


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------
def load_classifier(path) -> keras.Model:
    """Loads a classifier from a ``.keras`` file or a run directory.

    A directory must contain ``model.keras``. Raises FileNotFoundError or
    ValueError naming the path otherwise.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.keras"
        if not candidate.is_file():
            raise FileNotFoundError(
                f"run directory {str(path)!r} has no model.keras")
        path = candidate
    elif not path.exists():
        raise FileNotFoundError(f"no model file or run directory at {str(path)!r}")
    elif path.suffix != ".keras":
        raise ValueError(
            f"{str(path)!r} is not a .keras file (expected a .keras file or a "
            "run directory containing model.keras)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{str(path)!r} is not a valid .keras file (not a zip archive)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # zip errors, unknown layers, ...
        raise ValueError(f"could not load a Keras model from {str(path)!r}: "
                         f"{type(err).__name__}: {err}") from err
    return model


# ----------------------------------------------------------------------------
# Per-batch compiled attacks
# ----------------------------------------------------------------------------
def _as_model_fn(model):
    """``x -> logits`` in inference mode, with a (zero) gradient path to x.

    The ``0 * sum(x)`` term makes a model that stops the input gradient
    (``tf.stop_gradient``, ``tf.round``) yield a zero gradient instead of
    ``None``, so attacks run and :func:`sanity_checks` reports the masking.
    """
    if isinstance(model, keras.layers.Layer):
        # A weak reference: the compiled functions cached for the model (see
        # _cache_for) must not keep it alive.
        ref = weakref.ref(model)
        call = lambda x: ref()(x, training=False)  # noqa: E731
    elif callable(model):
        call = model
    else:
        raise TypeError(f"model must be a keras.Model or a callable, got {type(model)}")

    def model_fn(x):
        logits = tf.convert_to_tensor(call(x))
        return logits + tf.cast(0.0 * tf.reduce_sum(x), logits.dtype)

    return model_fn


def example_noise(shape, radius, seed, index, dtype=tf.float32):
    """``U(-radius, radius)`` noise of ``shape`` keyed on each example's index.

    Example ``i`` of the batch gets ``rng.uniform(shape[1:], fold_in(seed,
    index[i]))``: its random start depends only on ``(seed, index[i])``, not
    on the batch it lands in, so results do not depend on ``batch_size`` or on
    which examples are still being attacked.
    """
    seeds = tf.transpose(rng.fold_in(seed, index))  # [B, 2]
    tail = shape[1:]
    return tf.map_fn(lambda s: rng.uniform(tail, s, -radius, radius, dtype),
                     seeds, fn_output_signature=dtype, parallel_iterations=64)


_CACHE = weakref.WeakKeyDictionary()


def _cache_for(model):
    """The compiled-function cache of a Keras model (lives as long as it).

    Plain callables get a fresh dict: the caller keeps it for one evaluation.
    """
    if isinstance(model, keras.layers.Layer):
        return _CACHE.setdefault(model, {})
    return {}


def _batch_fn(model, cache, name, input_shape, steps, step_size, jit):
    """A compiled ``(x, y, index, eps, seed, rank) -> (x_adv, robust)``.

    One random start per example (:func:`example_noise` keyed on ``index``,
    the examples' positions in the evaluated set); ``rank`` only matters for
    ``apgd_t`` (which target, 1-based). ``robust`` is 1.0 where the attack
    failed: for fgsm/pgd the returned point is classified correctly, for APGD
    no iterate was misclassified. ``name="clean"`` returns ``(logits,
    correct)``.
    """
    key = (name, tuple(input_shape), steps, step_size, bool(jit))
    if key in cache:
        return cache[key]
    model_fn = _as_model_fn(model)

    def fn(x, y, index, eps, seed, rank):
        if name == "clean":
            logits = model_fn(x)
            return logits, objectives.correct(y, logits)
        if name == "fgsm":
            x_adv = attacks_lib.fgsm(model_fn, x, y, eps)
            return x_adv, objectives.correct(y, model_fn(x_adv))
        noise = example_noise(tf.shape(x), eps, seed, index, x.dtype)
        if name in ("pgd", "pgd_margin"):
            size = 2.5 * eps / steps if step_size is None else step_size
            x_adv = attacks_lib.pgd(model_fn, x, y, eps, size, steps,
                                    loss="ce" if name == "pgd" else "margin",
                                    init_noise=noise)
            return x_adv, objectives.correct(y, model_fn(x_adv))
        if name == "fab_t":
            return attacks_lib.fab_targeted(model_fn, x, y, eps, target_rank=rank,
                                            steps=steps)
        if name == "square":
            return attacks_lib.square(model_fn, x, y, eps, n_queries=steps,
                                      seed=seed, index=index)
        if name == "apgd_ce":
            out = attacks_lib.apgd(model_fn, x, y, eps, steps, loss="ce", init_noise=noise)
        elif name == "apgd_t":
            targets = attacks_lib.target_classes(y, model_fn(x), rank)
            out = attacks_lib.apgd(model_fn, x, y, eps, steps, loss="dlr_targeted",
                       targets=targets, init_noise=noise)
        else:
            raise ValueError(f"unknown attack {name!r}")
        return out.x_adv, out.robust

    signature = [tf.TensorSpec([None] + list(input_shape), tf.float32),
                 tf.TensorSpec([None], tf.int64),
                 tf.TensorSpec([None], tf.int64),
                 tf.TensorSpec([], tf.float32),
                 tf.TensorSpec([2], tf.int32),
                 tf.TensorSpec([], tf.int32)]
    compiled = tf.function(fn, input_signature=signature, jit_compile=bool(jit))
    cache[key] = compiled
    return compiled


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
def parse_attacks(attacks):
    """Validates attack names (a sequence or a comma-separated string).

    Returns a tuple of unique names (order kept); presets are kept as names.
    Raises ValueError naming the unknown attack.
    """
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",")]
    names = []
    for a in attacks:
        if a not in ATTACKS and a not in PRESETS:
            raise ValueError(
                f"unknown attack {a!r}; valid attacks: "
                f"{', '.join(ATTACKS + tuple(PRESETS))}")
        if a in names:
            raise ValueError(f"attack {a!r} is listed twice")
        names.append(a)
    if not names:
        raise ValueError("no attack given")
    return tuple(names)


def _check_epsilons(epsilons):
    if np.ndim(epsilons) == 0:
        epsilons = [epsilons]
    out = []
    for e in epsilons:
        try:
            e = float(e)
        except (TypeError, ValueError):
            raise ValueError(f"epsilon must be a number, got {e!r}") from None
        out.append(check_epsilon(e, allow_zero=True))
    if not out:
        raise ValueError("no epsilon given")
    if len(set(out)) != len(out):
        raise ValueError(f"epsilons must be distinct, got {out}")
    return out


def _positive_int(value, what, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_data(x, y):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch of inputs, got shape {x.shape}")
    if y.ndim == 2 and y.shape[0] == len(x) and y.shape[1] > 1:
        y = y.argmax(axis=1)  # one-hot or label-smoothed targets
    if y.shape != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class ids, got dtype {y.dtype}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32, copy=False)
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"x must hold images in [0, 1] (or uint8), got values in [{lo}, {hi}]")
    return x, y.astype(np.int64)


# ----------------------------------------------------------------------------
# The host loop
# ----------------------------------------------------------------------------
# Graph mode pads a batch by up to this fraction to reuse a batch shape that
# its compiled function already ran (see _Runner._reused_size).
REUSE_PAD = 0.1


class _Runner:
    """Runs compiled per-batch attacks over index subsets of ``x``."""

    def __init__(self, model, x, y, batch_size, seed, jit, progress):
        self.model, self.x, self.y = model, x, y
        self.batch_size, self.seed = batch_size, seed
        self.jit, self.progress = jit, progress
        self.cache = _cache_for(model)

    def run(self, name, idx, eps=0.0, steps=0, step_size=None, stream=(0,),
            rank=1, label=None, keep_adv=False):
        """``robust`` (bool, one per index) and optionally ``x_adv``.

        ``stream`` (ints) is folded into the seed: one random stream per
        attack, restart and target.
        """
        fn = _batch_fn(self.model, self.cache, name, self.x.shape[1:], steps,
                       None if step_size is None else float(step_size),
                       self.jit)
        seed = rng.make_seed(self.seed)
        for s in stream:
            seed = rng.fold_in(seed, s)
        robust = np.zeros(len(idx), bool)
        adv = np.empty((len(idx),) + self.x.shape[1:], np.float32) if keep_adv else None
        nb = -(-len(idx) // self.batch_size)
        # Balanced batches (650 -> 325 + 325, not 500 + 150): a small last
        # batch costs more per example (FAB-T 4 %, Square 5 % here, BUILD_NOTES.md).
        size = -(-len(idx) // max(nb, 1))
        start = time.perf_counter()
        for b in range(nb):
            sl = slice(b * size, (b + 1) * size)
            part = idx[sl]
            count = len(part)
            if self.jit:  # pad to a few bucket sizes: XLA compiles per shape
                bucket = min(self.batch_size, 1 << (count - 1).bit_length())
            else:
                bucket = self._reused_size((name, steps, step_size), count)
            if bucket > count:  # padded rows repeat the last example; dropped below
                part = np.concatenate([part, np.repeat(part[-1:], bucket - count)])
            out, ok = fn(tf.constant(self.x[part]), tf.constant(self.y[part]),
                         tf.constant(part, tf.int64),
                         tf.constant(eps, tf.float32), seed,
                         tf.constant(rank, tf.int32))
            robust[sl] = ok.numpy()[:count] > 0.5
            if keep_adv:
                adv[sl] = out.numpy()[:count]
            if self.progress:
                done = min((b + 1) * size, len(idx))
                rate = done / max(time.perf_counter() - start, 1e-9)
                print(f"[evaluate] {label or name} eps={eps:g}: batch {b + 1}/{nb}"
                      f", {int(robust[:done].sum())}/{done} robust, "
                      f"{rate:.0f} img/s", file=sys.stderr, flush=True)
        return (robust, adv) if keep_adv else robust

    def _reused_size(self, key, count):
        """Graph mode: a batch size this function already ran, if one is at
        most ``REUSE_PAD`` larger than ``count``, else ``count``.

        The fused element-wise parts of the attacks (``attacks.fused``) are
        XLA clusters, compiled once per batch shape (about 0.5 s each here),
        and each APGD-T / FAB-T target and restart sees a few examples fewer
        than the one before: reusing the last shape, padded, costs a few
        rows of compute instead of a compilation (963be75).
        """
        sizes = self.cache.setdefault(("batch sizes",) + key, set())
        fits = [s for s in sizes if count <= s <= count * (1 + REUSE_PAD)]
        if fits:
            return min(fits)
        sizes.add(count)
        return count

    def clean(self):
        return self.run("clean", np.arange(len(self.x)), label="clean")

    def attack(self, name, active, eps, *, pgd_steps, restarts, step_size,
               apgd_steps, apgd_targets, square_queries=SQUARE_QUERIES,
               fab_steps=FAB_STEPS):
        """Per-example robustness (bool [N]) of ``name`` on indices ``active``.

        Examples outside ``active`` are reported non-robust. Every restart
        (and every APGD-T and FAB-T target) only attacks the examples that are
        still robust, so an example is robust only if all of them failed.
        """
        robust = np.zeros(len(self.x), bool)
        if len(active) == 0:
            return robust
        if name == "fgsm":
            robust[active] = self.run("fgsm", active, eps, stream=(_STREAM[name],))
            return robust
        if name == "square":  # one run, as in AutoAttack
            robust[active] = self.run("square", active, eps, square_queries,
                                      stream=(_STREAM[name],))
            return robust
        steps = {"pgd": pgd_steps, "pgd_margin": pgd_steps, "fab_t": fab_steps}.get(
            name, apgd_steps)
        if name == "fab_t":  # deterministic: one run per target
            restarts = 1
        targets = range(1, apgd_targets + 1) if name in ("apgd_t", "fab_t") else [0]
        rounds = [(t, r) for t in targets for r in range(restarts)]
        robust[active] = True
        for t, r in rounds:
            left = np.flatnonzero(robust)
            if len(left) == 0:
                break
            label = name + (f" target {t}" if t else "") + (
                f" restart {r + 1}/{restarts}" if restarts > 1 else "")
            size = step_size if name in ("pgd", "pgd_margin") else None
            robust[left] = self.run(name, left, eps, steps, size,
                                    stream=(_STREAM[name], t, r), rank=max(t, 1),
                                    label=label)
        return robust


def _num_classes(model, x, y, attacks=()):
    """The model's number of outputs, checked against labels and attacks."""
    shape = getattr(model, "output_shape", None)
    if isinstance(shape, tuple) and shape and isinstance(shape[-1], int):
        num = shape[-1]
    else:
        num = int(_as_model_fn(model)(tf.constant(x[:1])).shape[-1])
    if y.min() < 0 or y.max() >= num:
        raise ValueError(f"labels must be in [0, {num - 1}] for a model with {num} "
                         f"outputs, got [{y.min()}, {y.max()}]")
    if num < 4 and {"apgd_t", "autoattack_lite", "autoattack"} & set(attacks):
        raise ValueError(f"apgd_t needs >= 4 classes, the model has {num}")
    return num


def _settings(names, pgd_steps, step_size, restarts, apgd_steps, apgd_targets,
              batch_size, seed, jit_compile, square_queries, fab_steps):
    """The report's ``settings``: every attack parameter used."""
    default_step = f"2.5 * eps / {pgd_steps}"
    return {
        "attacks": list(names),
        "pgd_steps": pgd_steps,
        "pgd_step_size": default_step if step_size is None else float(step_size),
        "fgsm_step_size": "eps",
        "restarts": restarts,
        "apgd_steps": apgd_steps,
        "apgd_targets": apgd_targets,
        "apgd_rho": attacks_lib.APGD_RHO,
        "apgd_momentum": attacks_lib.APGD_MOMENTUM,
        "apgd_initial_step_size": "2 * eps",
        "apgd_checkpoints": attacks_lib.apgd_checkpoints(apgd_steps),
        "batch_size": batch_size,
        "seed": seed,
        "jit_compile": bool(jit_compile),
        "square_queries": square_queries,
        "fab_steps": fab_steps,
        "fab_alpha_max": attacks_lib.FAB_ALPHA_MAX,
        "fab_eta": attacks_lib.FAB_ETA,
        "fab_beta": attacks_lib.FAB_BETA,
    }


def _square_beyond_gradient(done, stages, n):
    """The fraction of examples that only Square broke (None without Square
    and a gradient attack): a sign of gradient masking."""
    grad_names = [name for name in done if name in _GRADIENT_ATTACKS]
    if "square" in done and grad_names:
        missed = np.logical_and.reduce([done[name] for name in grad_names])
        return float((missed & ~done["square"]).mean())
    if "autoattack" in done:  # its Square only saw what the rest missed
        return stages["autoattack"][-1]["broken"] / n
    return None


def _attacks_at(runner, names, clean, eps, kw):
    """Runs ``names`` at one epsilon on the clean-correct examples: returns
    ``(done, spent, stages)``, each attack's per-example verdicts, its
    seconds and each preset's log of parts (a preset runs each part only on
    what the earlier parts left, and reuses a part already run in full)."""
    clean_idx = np.flatnonzero(clean)
    done, spent, stages = {}, {}, {}
    for n in names:
        t0 = time.perf_counter()
        if n in PRESETS:
            robust, log = clean.copy(), []
            for part in PRESETS[n]:
                t1 = time.perf_counter()
                if part in done:  # per-example results: reuse a full run
                    after = robust & done[part]
                elif part == PRESETS[n][0]:
                    done[part] = runner.attack(part, clean_idx, eps, **kw)
                    after = done[part].copy()
                else:
                    after = runner.attack(part, np.flatnonzero(robust), eps, **kw)
                log.append({"attack": part, "broken": int(robust.sum() - after.sum()),
                            "robust_accuracy": float(after.mean()),
                            "seconds": time.perf_counter() - t1})
                robust = after
            done[n] = robust
            stages[n] = log
        elif n not in done:
            done[n] = runner.attack(n, clean_idx, eps, **kw)
        spent[n] = time.perf_counter() - t0
    return done, spent, stages


def _all_epsilons(runner, names, clean, eps_list, kw, per_example):
    """Every attack at every epsilon: ``(per_attack, worst, seconds_by,
    beyond, stages, verdicts)``, each keyed on ``str(eps)`` (see
    :func:`evaluate`'s report)."""
    per_attack, worst, seconds_by, beyond, stages, verdicts = {}, {}, {}, {}, {}, {}
    for eps in eps_list:
        key = str(eps)
        done, seconds_by[key], eps_stages = _attacks_at(runner, names, clean, eps, kw)
        if eps_stages:
            stages[key] = eps_stages
        only_square = _square_beyond_gradient(done, eps_stages, len(clean))
        if only_square is not None:
            beyond[key] = only_square
        # A preset also reports its full apgd_ce run.
        report_names = list(names) + (["apgd_ce"] if any(n in PRESETS for n in names)
                                      and "apgd_ce" not in names else [])
        per_attack[key] = {n: float(done[n].mean()) for n in report_names}
        if per_example:
            verdicts[key] = {n: done[n].tolist() for n in report_names}
        worst[key] = float(np.logical_and.reduce([clean, *done.values()]).mean())
    return per_attack, worst, seconds_by, beyond, stages, verdicts


def evaluate(model, x, y, epsilons, attacks=("pgd",), *, batch_size=256,
             pgd_steps=20, restarts=1, step_size=None, apgd_steps=100, seed=0,
             progress=False, apgd_targets=9, jit_compile=False,
             square_queries=SQUARE_QUERIES, fab_steps=FAB_STEPS,
             per_example=False) -> dict:
    """Clean and robust accuracy of ``model`` on ``(x, y)`` under L-inf attacks.

    Args:
      model: a ``keras.Model`` (``[0, 1]`` images -> logits; called with
        ``training=False``) or any callable ``x -> logits``.
      x, y: images in ``[0, 1]`` (float, or uint8 divided by 255) and
        integer labels (or one-hot / label-smoothed targets: their arg-max).
      epsilons: one epsilon or a sequence (pixel units, in ``[0, 1]``).
      attacks: names from ``ATTACKS`` or ``PRESETS`` (a sequence or a
        comma-separated string).
      pgd_steps, step_size: PGD's steps and step size (default
        ``2.5 * eps / pgd_steps``, Madry et al.); FGSM's step is ``eps``.
      restarts: random starts of pgd/pgd_margin/apgd_ce, and per target of
        apgd_t.
      apgd_steps, apgd_targets: APGD iterations per run and APGD-T's number
        of target classes (capped at ``num_classes - 1``).
      square_queries: Square Attack's queries per example (one run).
      fab_steps: FAB-T iterations per target (targets: ``apgd_targets``).
      per_example: also return each example's verdicts (``per_example``:
        ``{str(eps): {attack: [bool, ...]}}``, True = robust; ``clean``: the
        clean verdicts), e.g. to compare with another implementation.
      seed: int; fixes every random start.
      progress: print a line per batch to stderr.
      jit_compile: compile the per-batch attacks with XLA.

    Returns a dict: ``clean_accuracy``; ``robust_accuracy`` (worst case over
    the attacks: a float for one epsilon, else ``{str(eps): float}``);
    ``attacks`` (``{str(eps): {attack: accuracy}}``; ``autoattack_lite``
    also reports its full ``apgd_ce`` run); ``epsilons``; ``num_examples``;
    ``settings``; ``seconds`` and ``images_per_second`` (examples x epsilons
    evaluated per second of wall time, all attacks included);
    ``attack_seconds`` (``{str(eps): {attack: seconds}}``); ``preset_stages``
    (``{str(eps): {preset: [{attack, broken, robust_accuracy, seconds}]}}``:
    how many examples each part of a preset broke and its time);
    ``square_beyond_gradient`` (only with ``square`` and a gradient attack:
    ``{str(eps): fraction of examples only Square broke}``); ``warnings``
    (from :func:`sanity_checks`).
    """
    start = time.perf_counter()
    x, y = _check_data(x, y)
    eps_list = _check_epsilons(epsilons)
    names = parse_attacks(attacks)
    (batch_size, pgd_steps, restarts, apgd_steps, apgd_targets, square_queries,
     fab_steps) = (_positive_int(v, n) for v, n in (
         (batch_size, "batch_size"), (pgd_steps, "pgd_steps"), (restarts, "restarts"),
         (apgd_steps, "apgd_steps"), (apgd_targets, "apgd_targets"),
         (square_queries, "square_queries"), (fab_steps, "fab_steps")))
    seed = _positive_int(seed, "seed", minimum=0)
    if step_size is not None and not (float(step_size) > 0):
        raise ValueError(f"step_size must be positive, got {step_size!r}")
    num_classes = _num_classes(model, x, y, names)
    apgd_targets = min(apgd_targets, num_classes - 1)

    runner = _Runner(model, x, y, batch_size, seed, jit_compile, progress)
    clean = runner.clean()
    kw = dict(pgd_steps=pgd_steps, restarts=restarts, step_size=step_size,
              apgd_steps=apgd_steps, apgd_targets=apgd_targets,
              square_queries=square_queries, fab_steps=fab_steps)

    per_attack, worst, seconds_by, beyond, stages, verdicts = _all_epsilons(
        runner, names, clean, eps_list, kw, per_example)

    seconds = time.perf_counter() - start
    report = {
        "clean_accuracy": float(clean.mean()),
        "robust_accuracy": worst[str(eps_list[0])] if len(eps_list) == 1 else worst,
        "attacks": per_attack,
        "epsilons": eps_list,
        "num_examples": int(len(x)),
        "settings": _settings(names, pgd_steps, step_size, restarts, apgd_steps,
                              apgd_targets, batch_size, seed, jit_compile,
                              square_queries, fab_steps),
        "seconds": seconds,
        "images_per_second": len(x) * len(eps_list) / max(seconds, 1e-9),
        "attack_seconds": seconds_by,
    }
    if stages:
        report["preset_stages"] = stages
    if per_example:
        report["per_example"] = {"clean": clean.tolist(), **verdicts}
    if beyond:
        report["square_beyond_gradient"] = beyond
    report["warnings"] = sanity_checks(model, x, y, report)
    return report


def robust_accuracy(model, x, y, epsilon, attack="pgd", steps=20,
                    step_size=None, restarts=1, batch_size=256, seed=0) -> float:
    """Accuracy under one attack at one epsilon (clean-wrong count as broken).

    ``steps`` is PGD's or APGD's iterations, or Square's queries. Compiled functions are
    cached per model, so calling this every few epochs does not retrace.
    """
    names = parse_attacks([attack])
    if attack in PRESETS:
        raise ValueError(f"robust_accuracy takes a single attack, not the preset {attack!r}")
    steps = _positive_int(steps, "steps")
    x, y = _check_data(x, y)
    eps = _check_epsilons(epsilon)
    if len(eps) != 1:
        raise ValueError("robust_accuracy takes one epsilon")
    num_classes = _num_classes(model, x, y, names)
    runner = _Runner(model, x, y, _positive_int(batch_size, "batch_size"),
                     _positive_int(seed, "seed", 0), False, False)
    clean_idx = np.flatnonzero(runner.clean())
    robust = runner.attack(names[0], clean_idx, eps[0], pgd_steps=steps,
                           restarts=_positive_int(restarts, "restarts"),
                           step_size=step_size, apgd_steps=steps,
                           apgd_targets=min(9, num_classes - 1),
                           square_queries=steps)
    return float(robust.mean())


def adversarial_examples(model, x, y, epsilon, attack="pgd", *, steps=20,
                         step_size=None, batch_size=256, seed=0,
                         target_rank=1):
    """``(x_adv, robust)`` of one attack (one start) on every example.

    ``steps`` is PGD's or APGD's iterations, or Square's queries. For ``apgd_t`` one target,
    ``target_rank`` (1 = the highest-scoring non-true class), is attacked.
    ``robust`` is True where the attack failed. The random starts are those
    of :func:`evaluate`'s first restart with the same ``seed``.
    """
    (name,) = parse_attacks([attack])
    if name in PRESETS:
        raise ValueError("adversarial_examples takes a single attack")
    x, y = _check_data(x, y)
    (eps,) = _check_epsilons(epsilon)
    _num_classes(model, x, y, (name,))
    runner = _Runner(model, x, y, _positive_int(batch_size, "batch_size"),
                     _positive_int(seed, "seed", 0), False, False)
    robust, x_adv = runner.run(
        name, np.arange(len(x)), eps, _positive_int(steps, "steps"), step_size,
        stream=((_STREAM[name],) if name == "square" else
                (_STREAM[name], target_rank if name == "apgd_t" else 0, 0)),
        rank=target_rank, keep_adv=True)
    return x_adv, robust


# ----------------------------------------------------------------------------
# Sanity checks
# ----------------------------------------------------------------------------
def _accuracy_map(report):
    """``{eps: {name: acc}}`` with the worst case under ``"worst case"``."""
    eps_keys = [str(float(e)) for e in report.get("epsilons", [])]
    attacks = report.get("attacks", {}) or {}
    robust = report.get("robust_accuracy")
    out = {}
    for k in eps_keys or list(attacks):
        row = dict(attacks.get(k, {}))
        if isinstance(robust, dict):
            if k in robust:
                row["worst case"] = robust[k]
        elif robust is not None:
            row["worst case"] = robust
        out[k] = row
    return out


def sanity_checks(model, x, y, report, *, sample_size=256,
                  tolerance=TOLERANCE) -> list:
    """Warnings (strings) that make an evaluation suspect; empty if none.

    Model checks on the first ``sample_size`` examples: outputs that look
    like probabilities (attacks and losses expect logits), non-finite
    outputs, and gradient masking (more than half of the examples with an
    all-zero input gradient of the cross-entropy). Report checks (skipped for
    keys the report lacks): a robust accuracy above the clean one; a stronger
    attack (pgd over fgsm, apgd over pgd) scoring more than ``tolerance``
    above a weaker one; a robust accuracy that rises with epsilon by more
    than ``tolerance``; Square breaking more than ``tolerance`` of the
    examples that every gradient attack missed (``square_beyond_gradient``).
    """
    warnings = []
    if model is not None and x is not None and len(x):
        xs, ys = _check_data(np.asarray(x)[:sample_size], np.asarray(y)[:sample_size])
        model_fn = _as_model_fn(model)
        xt = tf.constant(xs)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            out = tf.cast(model_fn(xt), tf.float32)
            loss = tf.reduce_sum(objectives.cross_entropy(ys, out))
        grad = tape.gradient(loss, xt)
        out = out.numpy()
        if not np.all(np.isfinite(out)):
            warnings.append("model outputs contain NaN or inf")
        elif out.min() >= 0.0 and out.max() <= 1.0 and np.allclose(
                out.sum(axis=-1), 1.0, atol=1e-3):
            warnings.append(
                "model outputs look like probabilities (every row is in [0, 1] "
                "and sums to 1): the attacks expect logits, so gradients are "
                "squashed by a second softmax; remove the final softmax")
        grad = np.zeros_like(xs) if grad is None else grad.numpy()
        zero = np.all(grad.reshape(len(xs), -1) == 0, axis=1).mean()
        if zero > 0.5:
            warnings.append(
                f"possible gradient masking: {zero:.0%} of {len(xs)} examples have "
                "an all-zero input gradient of the cross-entropy, so gradient "
                "attacks (fgsm, pgd, apgd_ce) overestimate robustness; compare "
                "pgd_margin/apgd_t or a gradient-free attack")

    acc = _accuracy_map(report or {})
    clean = (report or {}).get("clean_accuracy")
    pt = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for k, row in acc.items():
        if clean is not None:
            for n, v in row.items():
                if v > clean + 1e-9:
                    warnings.append(f"eps={k}: {n} robust accuracy {pt(v)} is "
                                    f"above the clean accuracy {pt(clean)}")
        for weak, strong in _STRENGTH_ORDER:
            if weak in row and strong in row and row[strong] > row[weak] + tolerance:
                what = ("fgsm beats pgd" if (weak, strong) == ("fgsm", "pgd")
                        else f"{strong} is weaker than {weak}")
                warnings.append(
                    f"eps={k}: {what} ({strong} {pt(row[strong])} > {weak} "
                    f"{pt(row[weak])}): the stronger attack should not leave a "
                    "higher accuracy; a sign of gradient masking or too few steps")
    for k, frac in ((report or {}).get("square_beyond_gradient") or {}).items():
        if frac > tolerance:
            warnings.append(
                f"eps={k}: possible gradient masking: square (gradient-free) breaks "
                f"{pt(frac)} of the examples that every gradient attack missed; "
                "the gradient attacks overestimate robustness")
    keys = sorted(acc, key=float)
    for small, large in zip(keys, keys[1:]):
        for n, v in acc[large].items():
            if n in acc[small] and v > acc[small][n] + tolerance:
                warnings.append(
                    f"{n}: robust accuracy rises with epsilon ({pt(acc[small][n])} "
                    f"at eps={small}, {pt(v)} at eps={large}): a sign of gradient "
                    "masking or a broken attack")
    return warnings


def format_table(report) -> str:
    """The report's accuracies as a text table (attacks x epsilons)."""
    acc = _accuracy_map(report)
    keys = sorted(acc, key=float)
    names = []
    for k in keys:
        for n in acc[k]:
            if n not in names and n != "worst case":
                names.append(n)
    names.append("worst case")
    corner = "attack / eps"
    width = max([len(n) for n in names] + [len(corner)])
    head = corner.ljust(width) + "".join(f"{float(k):>10.4g}" for k in keys)
    lines = [f"clean accuracy: {100 * report['clean_accuracy']:.2f}% "
             f"({report['num_examples']} examples)", head, "-" * len(head)]
    for n in names:
        cells = "".join(f"{100 * acc[k][n]:>9.2f}%" if n in acc[k] else f"{'-':>10}"
                        for k in keys)
        lines.append(f"{n:<{width}}{cells}")
    for k, presets in (report.get("preset_stages") or {}).items():
        for preset, log in presets.items():
            parts = ", ".join(f"{st['attack']} broke {st['broken']} ({st['seconds']:.1f} s)"
                              for st in log)
            lines.append(f"{preset} at eps={float(k):g}: {parts}")
    return "\n".join(lines)

# Names that lived here before 0.2.0: reading one says where it is now.
MOVED = {
    'run': 'tf_backsmooth.evaluate_lib.run',
    'plot_report': 'tf_backsmooth.evaluate_lib.plot_report',
    'EvalError': 'tf_backsmooth.evaluate_lib.EvalError',
    'apgd': 'tf_backsmooth.attacks.apgd',
    'apgd_checkpoints': 'tf_backsmooth.attacks.apgd_checkpoints',
    'dlr_loss': 'tf_backsmooth.attacks.dlr_loss',
    'dlr_targeted_loss': 'tf_backsmooth.attacks.dlr_targeted_loss',
    'target_classes': 'tf_backsmooth.attacks.target_classes',
    'APGDResult': 'tf_backsmooth.attacks.APGDResult',
    'APGD_RHO': 'tf_backsmooth.attacks.APGD_RHO',
    'APGD_MOMENTUM': 'tf_backsmooth.attacks.APGD_MOMENTUM',
}
__getattr__ = moved.getattr_for(__name__, MOVED)
