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

import dataclasses
import os
import sys
import textwrap

from absl import flags

from tf_backsmooth import config as config_lib
from tf_backsmooth import run_dir

_DEFAULTS = config_lib.TrainConfig()

# Method-specific keywords (a method's `extra_defaults` and `attack_training`,
# `methods.Method.keywords`): one flag each, default None (the method's own
# default), passed on in `TrainConfig.method_kwargs` only when set. A new
# keyword of a registered method needs a row here, or an entry in
# _UNFLAGGED_METHOD_KWARGS; tests/test_one_source.py checks both against the
# registry (this module does not import TensorFlow, so it cannot read it).
_METHOD_KWARGS = ("random_start", "lambda_", "init_scale", "attack_training", "clip_start")
# Method keywords that are part of a method's definition, not a knob: no flag.
_UNFLAGGED_METHOD_KWARGS = {
    "project": "n_fgsm's no-projection is what makes it N-FGSM",
    "init": "fast_trades' uniform start (and --init is the weight initialisation)",
}

# The sections of `bin/train --help`, in order.
SECTIONS = ("data", "model", "method", "optimisation", "evaluation", "health", "run",
            "distribution")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One bin/train flag: its section, name, kind, help and (for enums)
    choices. The default is the :class:`TrainConfig` field's of the same name
    (``"<config>"``) unless ``default`` is given (``None``: decided elsewhere, e.g. the
    method's own value, which the help then states)."""

    section: str
    name: str
    kind: str  # "enum", "string", "integer", "float", "bool" or "list"
    help: str
    choices: tuple = ()
    default: object = "<config>"


_EPS = "pixel units: inputs are in [0, 1]"
# Each method's default attack steps and step size (in terms of eps), for the
# help of --steps and --step_size; tests/test_flags_help.py checks them
# against the registry (methods.py), which this module cannot import.
METHOD_ATTACK_DEFAULTS = {
    "natural": (0, None), "pgd_at": (10, "2.5*eps/10"), "trades": (10, "eps/4"),
    "fgsm_rs": (1, "1.25*eps"), "fast_trades": (1, "eps"), "gradalign": (1, "eps"),
    "n_fgsm": (1, "eps"), "backward_smoothing": (1, "eps"),
}
TRAIN_FLAGS = (
    # Data.
    Flag("data", "dataset", "enum", "The dataset to train on (its official test split is the "
         "final test set).", config_lib.DATASETS),
    Flag("data", "data_dir", "string", "Folder with the dataset's files (IDX .gz for "
         "(fashion_)mnist, Keras' mnist.npz, CIFAR python batches) or a tensorflow-datasets "
         "data_dir. Default: $TF_BACKSMOOTH_DATA_DIR, ~/.keras/datasets, "
         "/usr/share/datasets, then tfds' own folder.", default=None),
    Flag("data", "validation_size", "integer", "Training images held out as the validation "
         "split (model selection, the failure check). Default: the dataset's (1000).",
         default=None),
    Flag("data", "num_train_examples", "integer", "Train on the first N training images only "
         "(default: all).", default=None),
    # Model.
    Flag("model", "model", "enum", "The classifier architecture (tf_backsmooth.models).",
         config_lib.MODELS),
    Flag("model", "normalize", "bool", "The first layer normalises by the dataset's mean and "
         "std; false: the network sees raw [0, 1] pixels (Wong et al.'s MNIST code)."),
    Flag("model", "init", "enum", "Weight initialisation: keras (Glorot uniform, zero bias) "
         "or torch (PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases).",
         config_lib.INITS),
    # Method.
    Flag("method", "method", "enum", "The robust-training method (docs/GUIDE.md compares "
         "them).", config_lib.METHODS),
    Flag("method", "epsilon", "float", f"L-inf attack budget, in {_EPS}, e.g. 0.3 (MNIST), "
         "0.1 (Fashion-MNIST), 0.031 (CIFAR)."),
    Flag("method", "epsilon_warmup_epochs", "float", "Ramp epsilon (and every attack step "
         "size with it) linearly from 0 to --epsilon over the first F epochs, updated every "
         "step; 0: no warm-up."),
    Flag("method", "step_size", "float", f"Attack step size, in {_EPS}. Default: the "
         "method's: " + ", ".join(f"{m} {size}" for m, (_, size) in METHOD_ATTACK_DEFAULTS.items()
                                  if size) + ".", default=None),
    Flag("method", "steps", "integer", "Attack steps per training step. Default: the "
         "method's: " + ", ".join(f"{m} {steps}" for m, (steps, _) in
                                  METHOD_ATTACK_DEFAULTS.items()) + ".", default=None),
    Flag("method", "gamma", "float", "backward_smoothing: scale of the uniform logit noise "
         "of the backward step (default 1).", default=None),
    Flag("method", "beta", "float", "trades, fast_trades and backward_smoothing: weight of "
         "the KL term of the loss (default 6).", default=None),
    Flag("method", "random_start", "bool", "Start the attack at a uniform random point of "
         "the eps-ball. Default: the method's (true for pgd_at, fgsm_rs and n_fgsm, false "
         "for gradalign).", default=None),
    Flag("method", "lambda_", "float", "gradalign: weight of the gradient-alignment "
         "regulariser (default 0.2).", default=None),
    Flag("method", "init_scale", "float", "FGSM family: radius of the random start in units "
         "of epsilon (default 1; n_fgsm 2).", default=None),
    Flag("method", "attack_training", "bool", "Run the attack with the model in training "
         "mode (BatchNorm batch statistics). Default: the method's reference mode.",
         default=None),
    Flag("method", "clip_start", "bool", "fgsm_rs: project the random start onto the "
         "eps-ball and [0, 1] before the gradient pass (default true; Wong et al.'s MNIST "
         "code: false).", default=None),
    # Optimisation.
    Flag("optimisation", "epochs", "integer", "Passes over the training split."),
    Flag("optimisation", "batch_size", "integer", "GLOBAL batch size: split evenly across "
         "replicas, so it must divide by their number."),
    Flag("optimisation", "optimizer", "enum", "The optimizer (sgd uses --momentum).",
         config_lib.OPTIMIZERS),
    Flag("optimisation", "lr", "float", "Peak learning rate: the schedule's value before "
         "its first drop (piecewise), at its top (cyclic) or start (cosine)."),
    Flag("optimisation", "momentum", "float", "Momentum of --optimizer=sgd (unused by adam "
         "and adamw)."),
    Flag("optimisation", "lr_schedule", "enum", "piecewise: divided by 10 at --lr_boundaries "
         "(default at 50 % and 75 % of training, the paper's); cyclic: linear up to --lr at "
         "40 % then down to 0 (Wong et al.); cosine decay; constant.",
         config_lib.LR_SCHEDULES),
    Flag("optimisation", "lr_boundaries", "list", "piecewise only: the epochs (numbers, "
         "increasing) at which the learning rate is divided by 10, e.g. 2.5 or 2.5,3.75; "
         "empty: at 50 % and 75 % of training."),
    Flag("optimisation", "weight_decay", "float", "Weight decay in Keras' decoupled form "
         "(w -= lr * wd * w); the PyTorch reference scripts add wd * w to the gradient "
         "instead (BUILD_NOTES.md)."),
    # Evaluation.
    Flag("evaluation", "eval_every", "integer", "Robust validation (PGD) every N epochs; it "
         "selects the best epoch's weights for export. 0: never (the last weights)."),
    Flag("evaluation", "eval_examples", "integer", "Validation images the robust validation "
         "attacks."),
    Flag("evaluation", "eval_pgd_steps", "integer", "PGD steps of the robust validation "
         "(step 2.5*eps/steps, one random start)."),
    Flag("evaluation", "test_examples", "integer", "Test images of the final clean and PGD "
         "evaluation (default: the whole test split).", default=None),
    Flag("evaluation", "test_pgd_steps", "integer", "PGD steps of the final test "
         "evaluation."),
    Flag("evaluation", "test_autoattack_examples", "integer", "Also attack the first N test "
         "images with autoattack_lite (APGD-CE, then APGD-T) at the end, and warn "
         "(OVERESTIMATED) when PGD leaves more than 10 points more of them robust (gradient "
         "masking). 0: off."),
    Flag("evaluation", "curve_every", "integer", "Robustness against compute: every N epochs "
         "(and after the last) attack the first --curve_examples test images with "
         "autoattack_lite and record it with the training seconds and gradient evaluations "
         "so far (metrics.jsonl, TensorBoard; bench/robustness_vs_compute.py draws it); its "
         "own time is not counted as training. 0: off."),
    Flag("evaluation", "curve_examples", "integer", "--curve_every: how many of the first "
         "test images the curve's autoattack_lite attacks."),
    # Health.
    Flag("health", "co_guard", "bool", "Watch for catastrophic overfitting during training "
         "(PGD against FGSM accuracy on a fixed training batch every --co_guard_every steps), "
         "roll back and mitigate (docs/CO_GUARD.md)."),
    Flag("health", "co_guard_every", "integer", "The guard measures every N training steps."),
    Flag("health", "co_guard_examples", "integer", "Fixed training images the guard "
         "measures on."),
    Flag("health", "co_guard_pgd_steps", "integer", "PGD steps of the guard's measurement."),
    Flag("health", "co_guard_rule", "enum", "When a measurement is a collapse "
         "(docs/CO_GUARD.md).", config_lib.CO_RULES),
    Flag("health", "co_guard_drop", "float", "Collapse: PGD accuracy fell this much (a "
         "fraction, 0.2 = 20 points) below its recent best."),
    Flag("health", "co_guard_gap", "float", "Collapse: FGSM accuracy exceeds PGD accuracy by "
         "this much (a fraction)."),
    Flag("health", "co_guard_floor", "float", "floor_and_gap rule: PGD accuracy at or below "
         "this (a fraction)."),
    Flag("health", "co_guard_policy", "enum", "What follows a rollback: shrink the step "
         "size, switch method, or nothing.", config_lib.CO_POLICIES),
    Flag("health", "co_guard_factor", "float", "shrink_step: multiply the step size by this."),
    Flag("health", "co_guard_fallback", "enum", "switch_method: the method to switch to.",
         config_lib.METHODS),
    Flag("health", "co_guard_max_collapses", "integer", "Stop training after this many "
         "collapses."),
    Flag("health", "failure_restarts", "integer", "Restart a failed attempt from scratch with "
         "a new seed (seed + 1000003 * k) up to N times. Failed: at the end of an epoch at "
         "full epsilon the accuracy on the method's own training attack exceeds the PGD "
         "accuracy by more than --failure_gap. A failed attempt is kept in attempt_K/ and "
         "counted in the training time. 0: no check."),
    Flag("health", "failure_gap", "float", "Training-attack minus PGD accuracy (a fraction) "
         "that marks a failed attempt."),
    Flag("health", "failure_warmup_gap", "float", "Also judge the epoch in which the epsilon "
         "warm-up ends, with this (looser) gap; a failure there restarts one epoch earlier. "
         "1: never (a gap of accuracies cannot exceed 1)."),
    Flag("health", "failure_rollback", "bool", "Start the next attempt from the checkpoint at "
         "the start of the failed epoch (new seed: new data order and attack draws) instead "
         "of from scratch; only the discarded epochs count as the failed attempt's cost."),
    Flag("health", "failure_data", "enum", "What the failure check attacks: validation (the "
         "validation split, at each robust validation) or train (a fixed, seeded subset of "
         "--failure_examples training images: no validation split needed).",
         config_lib.FAILURE_DATA),
    Flag("health", "failure_examples", "integer", "--failure_data=train: training images "
         "the check attacks."),
    Flag("health", "failure_pgd_steps", "integer", "--failure_data=train: PGD steps of the "
         "check (step 2.5*eps/steps, one random start); 0: --eval_pgd_steps."),
    Flag("health", "failure_overestimate_gap", "float", "--failure_data=train: also run "
         "autoattack_lite on the check's images and fail an attempt whose PGD accuracy there "
         "exceeds it by more than this (gradient masking); attempts are then compared by the "
         "worst case of both. 1: off."),
    Flag("health", "failure_keep", "enum", "When every attempt fails: best exports the "
         "attempt most accurate under the check's attack (all measured on the same images, "
         "recorded in results.json), last the last attempt.", config_lib.FAILURE_KEEP),
    Flag("health", "failure_from_epoch", "integer", "Judge only epochs from this one on "
         "(1-based); 0: from the first epoch at full epsilon. --failure_from_epoch=<epochs> "
         "judges the finished run only."),
    # Run.
    Flag("run", "model_dir", "string", "Run directory: config, manifest, metrics, "
         "checkpoints, results and model.keras. The same command resumes an unfinished run "
         "there."),
    Flag("run", "overwrite", "bool", "Replace a finished run in --model_dir (otherwise "
         "refused)."),
    Flag("run", "seed", "integer", "Seed of the weight initialisation, data order, "
         "augmentation and attack noise: a run repeats bit for bit on one machine."),
    Flag("run", "jit_compile", "enum", "XLA for the per-replica attack + loss + gradient "
         "function. auto: a rule per model, and where it is open (CPU, BatchNorm, 1-2 step "
         "attack) both modes timed on the first batch; manifest.json says which and why.",
         ("true", "false", "auto"), default="auto"),
    Flag("run", "dtype_policy", "enum", "Keras dtype policy: mixed_bfloat16 computes layers "
         "in bfloat16 (faster on CPUs with AMX), variables and losses in float32.",
         config_lib.DTYPE_POLICIES),
    Flag("run", "tensorboard", "bool", "Write TensorBoard events to <model_dir>/tensorboard."),
    Flag("run", "image_summaries", "bool", "Also write clean and adversarial image grids to "
         "TensorBoard."),
    Flag("run", "verbose", "integer", "Keras verbosity: 0 silent, 1 progress bar, 2 one line "
         "per epoch. Default: 1 on a terminal, else 2.", default=None),
    # Distribution.
    Flag("distribution", "strategy", "enum", "tf.distribute strategy: default (one device), "
         "mirrored (the GPUs of this host), multi_worker (hosts named by TF_CONFIG).",
         config_lib.STRATEGIES),
    Flag("distribution", "num_cpu_devices", "integer", "--strategy=mirrored without a GPU: "
         "split the CPU into N logical devices (for testing)."),
    Flag("distribution", "sync_batchnorm", "bool", "Synchronise BatchNorm statistics across "
         "replicas."),
)
_DEFINERS = {"enum": flags.DEFINE_enum, "string": flags.DEFINE_string,
             "integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
             "bool": flags.DEFINE_bool, "list": flags.DEFINE_list}


def default_of(row):
    """A row's default: its own, else the TrainConfig field's."""
    if row.default != "<config>":
        return row.default
    value = getattr(_DEFAULTS, row.name)
    return list(value) if row.kind == "list" else value


def define_flags(flag_values=flags.FLAGS):
    """Registers bin/train's flags (:data:`TRAIN_FLAGS`) on ``flag_values``
    (a fresh FlagValues in tests)."""
    for row in TRAIN_FLAGS:
        args = (row.name, default_of(row))
        if row.kind == "enum":
            args += (list(row.choices),)
        _define(flag_values, _DEFINERS[row.kind], *args, row.help)


def train_help(program="bin/train"):
    """``bin/train --help``: every flag of :data:`TRAIN_FLAGS` by section,
    with its kind or choices and its default."""
    lines = [f"usage: {program} --flagfile=FILE [--flag=value ...]", "",
             "  --flagfile=FILE: read flags from FILE, one --name=value a line "
             "(experiments/*.flags); later flags override it.", ""]
    for section in SECTIONS:
        lines.append(f"{section.capitalize()}:")
        for row in (r for r in TRAIN_FLAGS if r.section == section):
            what = "|".join(row.choices) if row.kind == "enum" else row.kind
            default = default_of(row)
            shown = ("none" if default is None
                     else ",".join(map(str, default)) if row.kind == "list"
                     else str(default).lower() if row.kind == "bool" else default)
            text = row.help if "default" in row.help.lower() else f"{row.help} (default: {shown})"
            text = textwrap.fill(text, width=96, initial_indent="      ",
                                 subsequent_indent="      ", break_on_hyphens=False)
            lines += [f"  --{row.name}=<{what}>", text]
        lines.append("")
    return "\n".join(lines)


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
    recorded = run_dir.recorded_config(path) if path else {}
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
