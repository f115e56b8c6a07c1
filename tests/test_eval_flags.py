"""bin/evaluate's flags in process: define_eval_flags -> EvalConfig.

The end-to-end and subprocess tests of bin/evaluate are in test_evaluation.py;
here every check runs without a subprocess or TensorFlow work.
"""

import keras
import pytest
from absl import flags

from tf_backsmooth import config as config_lib
from tf_backsmooth import flags as tbs_flags


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(10)]).save(folder / "model.keras")
    return folder


def _parse(*argv):
    fv = flags.FlagValues()
    tbs_flags.define_eval_flags(fv)
    fv(["evaluate", *argv])
    return tbs_flags.eval_config_from_flags(fv)


def test_defaults_and_values(model_dir, tmp_path):
    c = _parse(f"--model_path={model_dir}", "--epsilon=0.1,8/255")
    assert c.epsilon == (0.1, 8 / 255)
    assert (c.dataset, c.split, c.attacks, c.pgd_steps, c.restarts, c.apgd_steps,
            c.apgd_targets, c.square_queries, c.fab_steps, c.batch_size, c.seed) == (
        "mnist", "test", "pgd", 20, 1, 100, 9, 5000, 100, 256, 0)
    assert (c.num_examples, c.step_size, c.output, c.plot) == (None, None, None, None)
    assert c.progress is True and c.jit_compile is False
    c = _parse(f"--model_path={model_dir / 'model.keras'}", "--epsilon=0.3",
               "--attacks=autoattack", "--split=validation", "--dataset=cifar10",
               f"--data_dir={tmp_path}", "--num_examples=5", "--step_size=0.01",
               f"--output={tmp_path / 'r.json'}", f"--plot={tmp_path / 'a.PNG'}",
               "--noprogress", "--jit_compile")
    assert (c.attacks, c.split, c.dataset, c.num_examples, c.step_size) == (
        "autoattack", "validation", "cifar10", 5, 0.01)
    assert c.progress is False and c.jit_compile is True


def test_dataset_and_data_dir_default_to_the_runs(tmp_path):
    """In a bin/train run directory (config.json), --dataset and --data_dir not
    given are the run's; given ones win and are reported when they differ; a
    recorded data_dir that is no folder from here, or an unreadable
    config.json, leaves the flag defaults."""
    import json
    run = tmp_path / "run"
    run.mkdir()
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(10)]).save(run / "model.keras")
    data_dir = tmp_path / "fashion"
    data_dir.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"dataset": "fashion_mnist", "data_dir": str(data_dir), "seed": 3}))

    def parse(*argv):
        fv = flags.FlagValues()
        tbs_flags.define_eval_flags(fv)
        fv(["evaluate", *argv])
        return tbs_flags.eval_config_from_flags(fv), tbs_flags.run_defaults(fv)

    for path in (run, run / "model.keras"):
        c, (taken, differs) = parse(f"--model_path={path}", "--epsilon=0.1")
        assert (c.dataset, c.data_dir) == ("fashion_mnist", str(data_dir))
        assert taken == {"dataset": "fashion_mnist", "data_dir": str(data_dir)}
        assert differs == {}
    # Another dataset given: the run's folder (Fashion-MNIST's files, with MNIST's file
    # names) is not taken for it.
    c, (taken, differs) = parse(f"--model_path={run}", "--epsilon=0.1", "--dataset=mnist")
    assert (c.dataset, c.data_dir, taken) == ("mnist", None, {})
    assert differs == {"dataset": ("mnist", "fashion_mnist")}
    same_folder = f"{data_dir}/../{data_dir.name}"  # another spelling: no warning
    _, (_, differs) = parse(f"--model_path={run}", "--epsilon=0.1", f"--data_dir={same_folder}")
    assert differs == {}
    _, (_, differs) = parse(f"--model_path={run}", "--epsilon=0.1", f"--data_dir={tmp_path}")
    assert differs == {"data_dir": (str(tmp_path), str(data_dir))}
    (run / "config.json").write_text(json.dumps(
        {"dataset": "fashion_mnist", "data_dir": str(tmp_path / "gone")}))
    c, (taken, _) = parse(f"--model_path={run}", "--epsilon=0.1")
    assert (c.dataset, c.data_dir) == ("fashion_mnist", None)
    assert taken == {"dataset": "fashion_mnist"}
    (run / "config.json").write_text("{not json")
    c, (taken, differs) = parse(f"--model_path={run}", "--epsilon=0.1")
    assert (c.dataset, c.data_dir, taken, differs) == ("mnist", None, {}, {})


def test_evaluation_defaults_come_from_eval_config():
    from tf_backsmooth import data, evaluation
    assert evaluation.SQUARE_QUERIES == config_lib.EvalConfig.square_queries
    assert evaluation.FAB_STEPS == config_lib.EvalConfig.fab_steps
    assert set(config_lib.SPLITS) == set(data.SPLITS)


BAD = [
    ([], "epsilon is required"),
    (["--epsilon=abc"], "epsilon: 'abc' is not a number"),
    (["--epsilon=1/0"], "epsilon: '1/0' is not a number"),
    (["--epsilon=0.1,-0.2"], r"epsilon: '-0.2' must be in \(0, 1\]"),
    (["--epsilon=0"], "epsilon: '0' must be in"),
    (["--epsilon=8"], "epsilon: '8' must be in"),
    (["--epsilon=nan"], "epsilon: 'nan' must be in"),
    (["--epsilon=0.1,1/10"], "listed twice"),
    (["--epsilon=0.1", "--pgd_steps=0"], "pgd_steps"),
    (["--epsilon=0.1", "--restarts=-1"], "restarts"),
    (["--epsilon=0.1", "--apgd_steps=0"], "apgd_steps"),
    (["--epsilon=0.1", "--apgd_targets=0"], "apgd_targets"),
    (["--epsilon=0.1", "--square_queries=0"], "square_queries"),
    (["--epsilon=0.1", "--fab_steps=0"], "fab_steps"),
    (["--epsilon=0.1", "--batch_size=0"], "batch_size"),
    (["--epsilon=0.1", "--num_examples=0"], "num_examples"),
    (["--epsilon=0.1", "--seed=-1"], "seed"),
    (["--epsilon=0.1", "--step_size=0"], "step_size"),
    (["--epsilon=0.1", "--step_size=2"], "step_size"),
    (["--epsilon=0.1", "--split=dev"], "split=dev"),
    (["--epsilon=0.1", "--dataset=imagenet"], "dataset=imagenet: unknown dataset"),
    (["--epsilon=0.1", "--data_dir=/no/such/dir"], "data_dir=/no/such/dir"),
    (["--epsilon=0.1", "--attacks= , "], "attacks: no attack given"),
    (["--epsilon=0.1", "--plot=acc.jpg"], "plot=acc.jpg must end in .png"),
    (["--epsilon=0.1", "--output=report.txt"], "output=report.txt must end in .json"),
    (["--epsilon=0.1", "--output=/no/such/dir/r.json"], "output=.*does not exist"),
    (["--epsilon=0.1", "--output=."], "output=. must be a file path"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_rejected_value_names_the_flag(model_dir, argv, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _parse(f"--model_path={model_dir}", *argv)


@pytest.mark.parametrize("kind", ["none", "missing", "empty_dir", "not_keras"])
def test_model_path_checks(tmp_path, kind):
    (tmp_path / "w.h5").write_text("x")
    arg = {"none": [], "missing": [f"--model_path={tmp_path / 'nope.keras'}"],
           "empty_dir": [f"--model_path={tmp_path}"],
           "not_keras": [f"--model_path={tmp_path / 'w.h5'}"]}[kind]
    with pytest.raises(config_lib.ConfigError, match="^model_path"):
        _parse(*arg, "--epsilon=0.1")


def test_absl_rejects_bad_types():
    with pytest.raises(flags.IllegalFlagValueError, match="pgd_steps"):
        _parse("--pgd_steps=ten")
    with pytest.raises(flags.IllegalFlagValueError, match="step_size"):
        _parse("--step_size=big")


def test_eval_config_takes_numbers_too(model_dir):
    c = config_lib.EvalConfig(model_path=str(model_dir), epsilon=[0.1, 0.2],
                              attacks=("pgd", "fgsm"))
    assert c.epsilon == (0.1, 0.2)
    assert config_lib.EvalConfig(model_path=str(model_dir), epsilon=0.3).epsilon == (0.3,)
    with pytest.raises(config_lib.ConfigError, match="progress"):
        config_lib.EvalConfig(model_path=str(model_dir), epsilon=0.3, progress="yes")
