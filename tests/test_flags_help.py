"""bin/train's flags come from one table (flags.TRAIN_FLAGS) and explain
themselves: `bin/train --help` groups them by section, and every help says
what the flag does, its default and its choices."""

import re
import subprocess
import sys

from absl import flags
from conftest import REPO

from tf_backsmooth import config as config_lib
from tf_backsmooth import flags as tbs_flags


def _blocks(text):
    """{flag name: (section, its help block)} from `bin/train --help`."""
    out, section, name = {}, None, None
    for line in text.splitlines():
        if re.match(r"^[A-Z][a-z]+:$", line):
            section, name = line[:-1].lower(), None
        elif line.startswith("  --") and section:
            name = re.match(r"  --(\w+)=", line).group(1)
            assert name not in out, f"--{name} listed twice"
            out[name] = (section, line + "\n")
        elif name and line.startswith("      "):
            out[name] = (out[name][0], out[name][1] + line.strip() + " ")
    return out


def _problems(row, block):
    """What is wrong with a flag's help ``row`` as ``block`` shows it."""
    words = re.findall(r"[a-z0-9]+", row.help.lower())
    out = []
    if len(words) < 5:
        out.append("help too short")
    if " ".join(words) in (row.name.replace("_", " "), row.name.replace("_", "")):
        out.append("only restates the name")
    if "default" not in block.lower():
        out.append("no default shown")
    out += [f"choice {c} not shown" for c in row.choices if c not in block]
    return out


def test_help_is_grouped_and_every_flag_explains_itself():
    proc = subprocess.run([sys.executable, str(REPO / "bin" / "train"), "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    headings = [ln[:-1].lower() for ln in text.splitlines() if re.match(r"^[A-Z][a-z]+:$", ln)]
    assert headings == list(tbs_flags.SECTIONS)
    assert "--flagfile=FILE" in text
    blocks = _blocks(text)
    fv = flags.FlagValues()
    tbs_flags.define_flags(fv)
    assert set(blocks) == set(fv), "every flag is listed once, and only those"
    for row in tbs_flags.TRAIN_FLAGS:
        section, block = blocks[row.name]
        assert section == row.section
        assert _problems(row, block) == [], row.name
    assert "(default: fashion_mnist)" in blocks["dataset"][1]
    assert "(default: 0.1)" in blocks["epsilon"][1]


def test_the_check_catches_a_bad_help():
    """The check above can fail: a help that restates the name, one without a
    default and one that hides a choice are each reported."""
    bad = tbs_flags.Flag("data", "dataset", "enum", "Dataset.", config_lib.DATASETS)
    assert _problems(bad, "  --dataset=<mnist>\n      Dataset. (default: mnist)") == [
        "help too short", "only restates the name",
        *[f"choice {c} not shown" for c in config_lib.DATASETS if c != "mnist"]]
    good = tbs_flags.TRAIN_FLAGS[0]
    assert _problems(good, f"  --{good.name}\n      {good.help}") == ["no default shown"] + [
        f"choice {c} not shown" for c in good.choices if c not in good.help]


def test_flag_defaults_are_the_configs():
    fv = flags.FlagValues()
    tbs_flags.define_flags(fv)
    fv(["bin/train"])
    defaults = config_lib.TrainConfig()
    for row in tbs_flags.TRAIN_FLAGS:
        if row.default == "<config>":
            value = getattr(defaults, row.name)
            assert fv[row.name].value == (list(value) if row.kind == "list" else value), row.name
    assert tbs_flags.config_from_flags(fv) == config_lib.TrainConfig(
        verbose=tbs_flags.config_from_flags(fv).verbose)


def test_method_defaults_in_the_help_are_the_registrys():
    from tf_backsmooth import methods

    assert set(tbs_flags.METHOD_ATTACK_DEFAULTS) == set(methods.names())
    for name, (steps, size) in tbs_flags.METHOD_ATTACK_DEFAULTS.items():
        method = methods.get(name)
        assert method.default_steps == steps, name
        if size is None:
            assert method.default_step_size is None, name
        else:
            for eps in (0.1, 0.3):
                assert eval(size, {"eps": eps}) == method.default_step_size(eps), name
