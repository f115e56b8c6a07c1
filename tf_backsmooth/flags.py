"""The absl flags of ``bin/train`` and ``bin/evaluate``: the only module that
defines or reads flags.

``define_flags()`` registers bin/train's; ``config_from_flags(FLAGS)`` turns
parsed flags into a frozen :class:`tf_backsmooth.config.TrainConfig` (which
validates every value). ``define_eval_flags()`` and
``eval_config_from_flags(FLAGS)`` do the same for bin/evaluate and
:class:`tf_backsmooth.config.EvalConfig`. The two programs share some flag
names with different meanings (``--epsilon`` is one budget for training, a
list for evaluation), so a process defines one set only. Library code below
``bin/`` never reads flags: it takes a config.

Flag names equal the config field names, so every validation message (which
starts with the field name) names the flag.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from tf_backsmooth import config as config_lib
from tf_backsmooth import fileio

_DEFAULTS = config_lib.TrainConfig()

# Method-specific keywords (a method's `extra_defaults` and `attack_training`,
# `methods.Method.keywords`): one flag each, default None (the method's own
# default), passed on in `TrainConfig.method_kwargs` only when set. A new
# keyword of a registered method needs a row here, or an entry in
# _UNFLAGGED_METHOD_KWARGS; tests/test_one_source.py checks both against the
# registry (this module does not import TensorFlow, so it cannot read it).
_METHOD_KWARG_FLAGS = (
    (flags.DEFINE_bool, "random_start", "Random start (pgd_at, fgsm_rs, gradalign)."),
    (flags.DEFINE_float, "lambda_", "GradAlign regulariser weight."),
    (flags.DEFINE_float, "init_scale",
     "FGSM-family noise radius in units of epsilon (n_fgsm: 2)."),
    (flags.DEFINE_bool, "attack_training",
     "Run the attack in training mode (default: the method's reference mode)."),
    (flags.DEFINE_bool, "clip_start",
     "fgsm_rs: project the random start onto the eps-ball and [0, 1] before the "
     "gradient pass (default true; Wong et al.'s MNIST code: false)."),
)
_METHOD_KWARGS = tuple(name for _, name, _ in _METHOD_KWARG_FLAGS)
# Method keywords that are part of a method's definition, not a knob: no flag.
_UNFLAGGED_METHOD_KWARGS = {
    "project": "n_fgsm's no-projection is what makes it N-FGSM",
    "init": "fast_trades' uniform start (and --init is the weight initialisation)",
}


def define_flags(flag_values=flags.FLAGS):
    """Registers bin/train's flags on ``flag_values`` (a fresh FlagValues in
    tests)."""
    d = _DEFAULTS
    fv = flag_values
    # Data.
    _define(fv, flags.DEFINE_enum, "dataset", d.dataset, config_lib.DATASETS, "Dataset.")
    _define(fv, flags.DEFINE_string,
        "data_dir", None,
        "Folder with the canonical offline files (IDX .gz for (fashion_)mnist, "
        "CIFAR python batches) or a tensorflow-datasets data_dir. Default: "
        "known offline locations, then tfds' default folder.")
    _define(fv, flags.DEFINE_integer, "validation_size", None,
                         "Training examples held out for model selection "
                         "(default: the dataset's).")
    _define(fv, flags.DEFINE_integer, "num_train_examples", None,
                         "Train on the first N training examples only.")
    # Model and method.
    _define(fv, flags.DEFINE_enum, "model", d.model, config_lib.MODELS, "Classifier.")
    _define(fv, flags.DEFINE_bool, "normalize", d.normalize,
            "First layer normalises by the dataset's mean and std (false: the "
            "network sees raw [0, 1] pixels, as Wong et al.'s MNIST code).")
    _define(fv, flags.DEFINE_enum, "init", d.init, config_lib.INITS,
            "Weight initialisation: keras (Glorot uniform, zero bias) or torch "
            "(PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels "
            "and biases).")
    _define(fv, flags.DEFINE_enum, "method", d.method, config_lib.METHODS,
                      "Robust-training method.")
    _define(fv, flags.DEFINE_float, "epsilon", d.epsilon,
                       "L-inf budget in pixel units (inputs in [0, 1]).")
    _define(fv, flags.DEFINE_float, "epsilon_warmup_epochs",
            d.epsilon_warmup_epochs,
            "Ramp epsilon (and the attack step sizes with it) linearly from 0 "
            "to --epsilon over the first F epochs, updated every step "
            "(0: no warm-up).")
    _define(fv, flags.DEFINE_float, "step_size", None,
                       "Attack step size (default: the method's).")
    _define(fv, flags.DEFINE_integer, "steps", None, "Attack steps (default: the method's).")
    _define(fv, flags.DEFINE_float, "gamma", None, "Backward Smoothing logit-noise scale "
                       "(default 1).")
    _define(fv, flags.DEFINE_float, "beta", None, "TRADES/BS KL weight (default 6).")
    for definer, name, help_text in _METHOD_KWARG_FLAGS:
        _define(fv, definer, name, None, help_text)
    # Optimisation.
    _define(fv, flags.DEFINE_integer, "epochs", d.epochs, "Training epochs.")
    _define(fv, flags.DEFINE_integer, "batch_size", d.batch_size,
                         "GLOBAL batch size (split across replicas).")
    _define(fv, flags.DEFINE_enum, "optimizer", d.optimizer, config_lib.OPTIMIZERS,
                      "Optimizer.")
    _define(fv, flags.DEFINE_float, "lr", d.lr, "Peak learning rate.")
    _define(fv, flags.DEFINE_float, "momentum", d.momentum, "SGD momentum.")
    _define(fv, flags.DEFINE_enum, "lr_schedule", d.lr_schedule, config_lib.LR_SCHEDULES,
                      "piecewise: /10 at 50% and 75% of training (the paper); "
                      "cyclic: linear up to lr at 40% then down to 0; cosine.")
    _define(fv, flags.DEFINE_list, "lr_boundaries", list(d.lr_boundaries),
            "piecewise only: the epochs (floats, increasing) at which the "
            "learning rate is divided by 10, e.g. 2.5 or 2.5,3.75 (empty: at "
            "50% and 75% of training).")
    _define(fv, flags.DEFINE_float, "weight_decay", d.weight_decay,
                       "Weight decay, Keras' decoupled form (w -= lr * wd * w); the "
                       "PyTorch references add wd * w to the gradient instead "
                       "(BUILD_NOTES.md).")
    # Run.
    _define(fv, flags.DEFINE_string, "model_dir", d.model_dir, "Run directory.")
    _define(fv, flags.DEFINE_bool, "overwrite", d.overwrite,
                      "Replace a finished run in model_dir.")
    _define(fv, flags.DEFINE_integer, "seed", d.seed, "Seed for init, data order, noise.")
    _define(fv, flags.DEFINE_enum, "jit_compile", "auto", ["true", "false", "auto"],
                      "XLA for the per-replica attack+loss+gradient function. auto: a "
                      "rule per model, and where it is open (CPU, BatchNorm, 1-2 step "
                      "attack) both modes timed on the first batch; manifest.json says "
                      "which and why.")
    _define(fv, flags.DEFINE_integer, "eval_every", d.eval_every,
                         "Robust validation every N epochs (0: never).")
    _define(fv, flags.DEFINE_integer, "eval_examples", d.eval_examples,
                         "Validation examples for the robust evaluation.")
    _define(fv, flags.DEFINE_integer, "eval_pgd_steps", d.eval_pgd_steps,
                         "PGD steps of the validation robust evaluation.")
    _define(fv, flags.DEFINE_integer, "test_examples", None,
                         "Test examples for the final report (default: all).")
    _define(fv, flags.DEFINE_integer, "test_pgd_steps", d.test_pgd_steps,
                         "PGD steps of the final test evaluation.")
    _define(fv, flags.DEFINE_integer, "test_autoattack_examples", d.test_autoattack_examples,
            "After the final PGD evaluation, attack the first N test images with "
            "autoattack_lite (APGD-CE, then APGD-T) as well, and warn when PGD on the "
            "same images is more than 10 points more accurate (gradient masking: PGD "
            "overestimates robustness). 0: off.")
    _define(fv, flags.DEFINE_enum, "strategy", d.strategy, config_lib.STRATEGIES,
                      "Distribution strategy.")
    _define(fv, flags.DEFINE_integer, "num_cpu_devices", d.num_cpu_devices,
                         "With --strategy=mirrored and no GPU: split the CPU "
                         "into N logical devices (testing).")
    _define(fv, flags.DEFINE_enum, "dtype_policy", d.dtype_policy, config_lib.DTYPE_POLICIES,
                      "Keras dtype policy.")
    _define(fv, flags.DEFINE_bool, "sync_batchnorm", d.sync_batchnorm,
                      "Synchronise BatchNorm statistics across replicas.")
    _define(fv, flags.DEFINE_bool, "tensorboard", d.tensorboard, "Write TensorBoard events.")
    _define(fv, flags.DEFINE_bool, "image_summaries", d.image_summaries,
                      "Write clean/adversarial image grids to TensorBoard.")
    # Catastrophic-overfitting guard.
    _define(fv, flags.DEFINE_bool, "co_guard", d.co_guard,
            "Watch for catastrophic overfitting (PGD vs FGSM accuracy on a fixed "
            "training batch), roll back and mitigate (docs/CO_GUARD.md).")
    _define(fv, flags.DEFINE_integer, "co_guard_every", d.co_guard_every,
            "Guard measurement every N training steps.")
    _define(fv, flags.DEFINE_integer, "co_guard_examples", d.co_guard_examples,
            "Fixed training examples the guard measures on.")
    _define(fv, flags.DEFINE_integer, "co_guard_pgd_steps", d.co_guard_pgd_steps,
            "PGD steps of the guard's measurement.")
    _define(fv, flags.DEFINE_enum, "co_guard_rule", d.co_guard_rule,
            config_lib.CO_RULES, "Collapse rule (docs/CO_GUARD.md).")
    _define(fv, flags.DEFINE_float, "co_guard_drop", d.co_guard_drop,
            "Collapse: PGD accuracy fell this much below its recent best.")
    _define(fv, flags.DEFINE_float, "co_guard_gap", d.co_guard_gap,
            "Collapse: FGSM accuracy exceeds PGD accuracy by this much.")
    _define(fv, flags.DEFINE_float, "co_guard_floor", d.co_guard_floor,
            "floor_and_gap rule: PGD accuracy at or below this.")
    _define(fv, flags.DEFINE_enum, "co_guard_policy", d.co_guard_policy,
            config_lib.CO_POLICIES, "Mitigation after a rollback.")
    _define(fv, flags.DEFINE_float, "co_guard_factor", d.co_guard_factor,
            "shrink_step: multiply the step size by this.")
    _define(fv, flags.DEFINE_enum, "co_guard_fallback", d.co_guard_fallback,
            config_lib.METHODS, "switch_method: the method to switch to.")
    _define(fv, flags.DEFINE_integer, "co_guard_max_collapses",
            d.co_guard_max_collapses, "Stop after this many collapses.")
    # Failed runs.
    _define(fv, flags.DEFINE_integer, "failure_restarts", d.failure_restarts,
            "Restart training from scratch with a new seed (seed + 1000003 * k) up "
            "to N times when, at the end of an epoch at full epsilon, the accuracy "
            "on the method's own training attack exceeds the validation PGD "
            "accuracy by more than --failure_gap (the failed attempt is kept in "
            "attempt_K/ and counted in the training time).")
    _define(fv, flags.DEFINE_float, "failure_gap", d.failure_gap,
            "Training-attack minus validation PGD accuracy that marks a failed run.")
    _define(fv, flags.DEFINE_float, "failure_warmup_gap", d.failure_warmup_gap,
            "Also judge the epoch in which the epsilon warm-up ends, with this "
            "(looser) gap; a failure found there restarts one epoch earlier "
            "(1, the default: never, a gap of accuracies cannot exceed 1).")
    _define(fv, flags.DEFINE_bool, "failure_rollback", d.failure_rollback,
            "Start the next attempt after a failure from the checkpoint at the "
            "start of the failed epoch (with the new seed: new data order and "
            "attack draws) instead of from scratch; only the discarded epochs "
            "are counted as the failed attempt's cost.")
    _define(fv, flags.DEFINE_enum, "failure_data", d.failure_data,
            config_lib.FAILURE_DATA,
            "What the failure check measures PGD accuracy on: 'validation' (the "
            "validation split, at each robust validation) or 'train' (a fixed, "
            "seeded subset of --failure_examples training images, measured with "
            "PGD-<failure_pgd_steps> at each judged epoch: no validation split needed).")
    _define(fv, flags.DEFINE_integer, "failure_examples", d.failure_examples,
            "--failure_data=train: how many training images the check attacks.")
    _define(fv, flags.DEFINE_integer, "failure_pgd_steps", d.failure_pgd_steps,
            "--failure_data=train: the PGD steps of the check's attack (step size "
            "2.5*eps/steps, one random start); 0: --eval_pgd_steps. The final NOT ROBUST "
            "check uses --test_pgd_steps (20).")
    _define(fv, flags.DEFINE_float, "failure_overestimate_gap", d.failure_overestimate_gap,
            "--failure_data=train: at each judged epoch also run autoattack_lite on the "
            "check's images and fail the attempt when its PGD accuracy there exceeds "
            "the autoattack_lite accuracy by more than this (gradient masking that PGD "
            "misses; the final check's warning uses 0.1); attempts are then compared by "
            "the worst case of both attacks. 1 (default): off.")
    _define(fv, flags.DEFINE_enum, "failure_keep", d.failure_keep, config_lib.FAILURE_KEEP,
            "When every attempt fails the check (the last one allowed trains to the "
            "end): 'best' exports the attempt whose weights are most accurate under "
            "the check's PGD on the check's images (all attempts measured on the same "
            "images, recorded in results.json), 'last' the last attempt.")
    _define(fv, flags.DEFINE_integer, "failure_from_epoch", d.failure_from_epoch,
            "Judge only epochs from this one on (1-based; 0: from the first epoch "
            "trained at full epsilon). --failure_from_epoch=<epochs> judges the "
            "finished run only, for recipes whose healthy runs dip mid-training.")
    _define(fv, flags.DEFINE_integer, "verbose", None, "Keras verbosity: 0 silent, 1 "
                         "progress bar, 2 one line per epoch (default: 1 on a "
                         "terminal, else 2).")


def define_eval_flags(flag_values=flags.FLAGS):
    """Registers bin/evaluate's flags on ``flag_values`` (a fresh FlagValues
    in tests)."""
    d = config_lib.EvalConfig  # the dataclass: its class attributes are the defaults
    fv = flag_values
    _define(fv, flags.DEFINE_string, "model_path", None,
            "A .keras file, or a run directory containing model.keras.")
    _define(fv, flags.DEFINE_string, "dataset", d.dataset,
            "Dataset name (tf_backsmooth.data). Default: the run's, when --model_path is a "
            "bin/train run directory; otherwise mnist.")
    _define(fv, flags.DEFINE_string, "data_dir", None,
            "Folder holding the dataset's files. Default: the run's, when --model_path is a "
            "bin/train run directory and that folder exists from here.")
    _define(fv, flags.DEFINE_string, "split", d.split,
            "Split to evaluate: train, validation or test.")
    _define(fv, flags.DEFINE_string, "epsilon", None,
            "L-inf budget(s) in [0, 1] pixel units, comma-separated; fractions such as "
            "8/255 are accepted.")
    _define(fv, flags.DEFINE_string, "attacks", d.attacks,
            "Comma-separated attacks: fgsm, pgd, pgd_margin, apgd_ce, apgd_t, fab_t, square, "
            "or the presets autoattack_lite (apgd_ce, apgd_t) and autoattack (apgd_ce, "
            "apgd_t, fab_t, square: AutoAttack's standard version).")
    _define(fv, flags.DEFINE_integer, "pgd_steps", d.pgd_steps, "PGD iterations.")
    _define(fv, flags.DEFINE_float, "step_size", None,
            "PGD step size (default 2.5 * eps / pgd_steps).")
    _define(fv, flags.DEFINE_integer, "restarts", d.restarts,
            "Random starts per attack (per target for apgd_t; fab_t and square run once).")
    _define(fv, flags.DEFINE_integer, "apgd_steps", d.apgd_steps, "APGD iterations per run.")
    _define(fv, flags.DEFINE_integer, "apgd_targets", d.apgd_targets,
            "Target classes of apgd_t.")
    _define(fv, flags.DEFINE_integer, "square_queries", d.square_queries,
            "Queries per example of the Square Attack (--attacks=square).")
    _define(fv, flags.DEFINE_integer, "fab_steps", d.fab_steps,
            "FAB-T iterations per target (--attacks=fab_t).")
    _define(fv, flags.DEFINE_integer, "num_examples", None,
            "Evaluate the first N examples of the split (default: all).")
    _define(fv, flags.DEFINE_integer, "batch_size", d.batch_size, "Examples per attack batch.")
    _define(fv, flags.DEFINE_integer, "seed", d.seed, "Seed of the random starts.")
    _define(fv, flags.DEFINE_string, "output", None, "Write the JSON report here.")
    _define(fv, flags.DEFINE_string, "plot", None,
            "Write a PNG plot of accuracy vs epsilon here.")
    _define(fv, flags.DEFINE_bool, "progress", d.progress,
            "Print a progress line per batch to stderr.")
    _define(fv, flags.DEFINE_bool, "jit_compile", d.jit_compile, "Compile the attacks with XLA.")


def _define(fv, definer, *args, **kwargs):
    return definer(*args, flag_values=fv, **kwargs)


def config_from_flags(FLAGS) -> config_lib.TrainConfig:  # noqa: N803
    """Builds the frozen config; raises ConfigError naming a bad flag."""
    fields = {f.name for f in config_lib.dataclasses.fields(config_lib.TrainConfig)}
    values = {name: FLAGS[name].value for name in fields
              if name in FLAGS and name != "method_kwargs"}
    if values.get("verbose") is None:
        values["verbose"] = 1 if sys.stdout.isatty() else 2
    values["jit_compile"] = {"true": True, "false": False,
                             "auto": "auto"}[FLAGS.jit_compile]
    values["lr_boundaries"] = _floats("lr_boundaries", FLAGS.lr_boundaries)
    values["method_kwargs"] = {k: FLAGS[k].value for k in _METHOD_KWARGS
                               if FLAGS[k].value is not None}
    return config_lib.TrainConfig(**values)


def _floats(name, items):
    out = []
    for item in items or ():
        try:
            out.append(float(item))
        except ValueError:
            raise config_lib.ConfigError(
                f"{name}: {item!r} is not a number (expected a comma-separated "
                "list of numbers)") from None
    return tuple(out)


def flags_text(FLAGS) -> str:  # noqa: N803
    """The run's flags as a flagfile (only this module's flags)."""
    lines = []
    for flag in sorted(FLAGS.get_key_flags_for_module(__name__),
                       key=lambda f: f.name):
        if flag.value is not None:
            lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


# bin/evaluate's flags that a run directory's config.json supplies when not given.
RUN_DEFAULTS = ("dataset", "data_dir")


def run_defaults(FLAGS):  # noqa: N803
    """What ``bin/train`` recorded for ``RUN_DEFAULTS`` in the run that
    ``--model_path`` names (a run directory, or a ``.keras`` file in one):
    ``(taken, differs)``. ``taken`` maps each flag not given on the command
    line to the run's value; ``differs`` maps each given flag whose value is
    not the run's to ``(given, run's)`` (``data_dir``: another folder, not
    another spelling of the same one). A ``data_dir`` that is not a folder
    from here (it was recorded relative to where training ran), or that
    belongs to another dataset than the one given, is not taken.
    Both are empty without a readable config.json."""
    path = FLAGS["model_path"].value
    if not path:
        return {}, {}
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:  # train_lib.CONFIG; train_lib itself would load TensorFlow before the flags are checked
        recorded = fileio.read_json(os.path.join(folder, "config.json"), default={})
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(recorded, dict):
        return {}, {}
    taken, differs = {}, {}
    for name in RUN_DEFAULTS:  # dataset first: the run's folder holds the run's dataset only
        value = recorded.get(name)
        if not isinstance(value, str) or (name == "data_dir" and "dataset" in differs):
            continue
        if FLAGS[name].present:
            given = FLAGS[name].value
            same = (os.path.realpath(given) == os.path.realpath(value)
                    if name == "data_dir" and given else given == value)
            if not same:
                differs[name] = (given, value)
        elif name != "data_dir" or os.path.isdir(value):
            taken[name] = value
    return taken, differs


def eval_config_from_flags(FLAGS, taken=None) -> config_lib.EvalConfig:  # noqa: N803
    """Builds the frozen evaluation config; raises ConfigError naming a bad
    flag (the message starts with the flag's name). ``--dataset`` and
    ``--data_dir`` not given default to the run's: ``taken`` from
    :func:`run_defaults`, read here when not passed."""
    fields = [f.name for f in config_lib.dataclasses.fields(config_lib.EvalConfig)]
    values = {name: FLAGS[name].value for name in fields}
    values.update(run_defaults(FLAGS)[0] if taken is None else taken)
    return config_lib.EvalConfig(**values)
