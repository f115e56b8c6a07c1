"""The documents say what is true now, and only name things that exist.

* No tracked text file tells the project's work history: no stretch-of-work
  wording (the word is built below, not written, so this file passes its own
  check) and no internal issue numbers; dates and commits say when.
* Every ``--flag`` named in README.md, BUILD_NOTES.md, docs/*.md and the
  experiment flagfiles exists in the program it is given to: bin/train,
  bin/evaluate (their flags are read from ``tf_backsmooth.flags`` on fresh
  absl FlagValues, without TensorFlow), a bench/ or tests/ script (its own
  argparse / absl definitions), or a listed outside tool (pip, pytest, ...).
* Every ``experiments/...flags`` file and every local document they name exists.
* ``examples/custom_method.py`` runs (a subprocess; needs TensorFlow).

Only the last test imports TensorFlow (in its subprocess).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------
# Tracked files
# ----------------------------------------------------------------------------
SKIP_SUFFIXES = {".json", ".jsonl", ".png", ".jpg", ".jpeg", ".gif", ".npz", ".npy",
                 ".h5", ".keras", ".pb", ".gz", ".tar", ".zip", ".pdf"}


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    return [REPO / name for name in out.decode().split("\0") if name]


def read_text(path):
    """The file's text, or None for binary, undecodable, skipped or absent files."""
    if path.suffix.lower() in SKIP_SUFFIXES or not path.is_file():
        return None
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ----------------------------------------------------------------------------
# (a) No work history
# ----------------------------------------------------------------------------
_WORD = "sess" + "ion"
HISTORY_WORD = re.compile(r"\b" + _WORD + r"s?\b", re.IGNORECASE)
# Technical uses that may stay (TensorFlow 1 / requests API names).
HISTORY_WORD_ALLOWED = re.compile(
    r"(?:\btf\.|\bv1\.|\brequests\.|Interactive)" + _WORD.capitalize() + r"\b")
ISSUE_REF = re.compile(r"\bissues?\s*(?:#\s*)?\d+", re.IGNORECASE)


def history_hits(text):
    """``(line number, line)`` of every line with history wording."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        cleaned = HISTORY_WORD_ALLOWED.sub("", line)
        if HISTORY_WORD.search(cleaned) or ISSUE_REF.search(cleaned):
            hits.append((number, line.strip()[:120]))
    return hits


def test_history_patterns_catch_what_they_should():
    issue = "iss" + "ue"
    bad = ["measured in " + _WORD + " 9", "since " + _WORD + "s 8-9",
           issue.capitalize() + " 11's criterion", f"({issue} 14)", f"{issue} #7",
           f"{issue}s 11 and 13", _WORD.capitalize() + " notes"]
    good = ["tf." + _WORD.capitalize() + "()", "tensorflow/tensorflow#72388",
            "the issue is the learning rate", "an issue with 2 replicas"]
    assert all(history_hits(text) for text in bad), [t for t in bad if not history_hits(t)]
    assert not any(history_hits(text) for text in good)


def test_no_work_history_in_tracked_files():
    hits = []
    for path in tracked_files():
        text = read_text(path)
        if text is None:
            continue
        hits += [f"{path.relative_to(REPO)}:{n}: {line}" for n, line in history_hits(text)]
    assert not hits, ("work-history wording (use a date or a commit instead):\n"
                      + "\n".join(hits))


# ----------------------------------------------------------------------------
# (b) Flags
# ----------------------------------------------------------------------------
ABSL_SPECIAL = {"flagfile", "undefok", "help", "helpfull", "helpshort", "helpxml"}

# Flags of outside tools the documents may name, by tool.
TOOL_FLAGS = {
    "pip": {"upgrade", "editable", "no-deps", "index-url", "extra-index-url", "user",
            "no-cache-dir"},
    "pytest": {"durations", "timeout", "strict-markers", "lf", "maxfail", "co"},
    "tensorboard": {"logdir", "port", "bind_all"},
    "apt-get": set(),
    "git": {"oneline", "format", "date", "reverse", "depth", "no-local"},
    "ruff": {"fix"},
    "venv": {"system-site-packages", "clear"},
    "pdoc": {"output-directory", "docformat"},
}

TOOL = re.compile(r"(bin/train|bin/evaluate|(?:bench|tests|examples)/\w+\.py|"
                  r"\bpip3?\b|\bpytest\b|\bapt-get\b|\btensorboard\b|\bgit\b|\bruff\b|"
                  r"\bvenv\b|\bpdoc\b)")
FLAG = re.compile(r"(?<![\w\-/.])--([a-z][a-z0-9_\-]*)")
BACKTICKS = re.compile(r"`([^`]+)`")


def _absl_flag_names(define):
    from absl import flags

    values = flags.FlagValues()
    define(values)
    names = set(values)
    booleans = {name for name in names if values[name].boolean}
    return names | {"no" + name for name in booleans}


def _absl_own_flags():
    from absl import app, flags, logging  # noqa: F401  (define absl's flags)

    return set(flags.FLAGS) | ABSL_SPECIAL


def _script_flags(path, seen=None):
    """The flags a bench/ tests/ examples/ script defines itself (argparse or
    absl), plus those of sibling modules it uses (``reproduce.add_run_args``)."""
    seen = set() if seen is None else seen
    if path in seen or not path.is_file():
        return set()
    seen.add(path)
    source = path.read_text()
    names = set(re.findall(r"add_argument\(\s*[\"']--([\w\-]+)", source))
    names |= set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)", source))
    for module in re.findall(r"^\s*(?:import|from)\s+(\w+)", source, re.M):
        names |= _script_flags(path.parent / f"{module}.py", seen)
    if "argv" in source and "--" in source:  # hand-parsed switches, e.g. examples/
        names |= set(re.findall(r"[\"']--([\w\-]+)[\"']", source))
    return names | {"help"}


@pytest.fixture(scope="module")
def known_flags():
    from tf_backsmooth import flags as tbs_flags

    absl_own = _absl_own_flags()
    train = _absl_flag_names(tbs_flags.define_flags) | absl_own
    evaluate = _absl_flag_names(tbs_flags.define_eval_flags) | absl_own
    return {"bin/train": train, "bin/evaluate": evaluate, None: train | evaluate}


def allowed_for(tool, known):
    if tool is None or tool in known:
        return known[tool]
    if tool.endswith(".py"):
        return _script_flags(REPO / tool)
    if tool == "pip3":
        tool = "pip"
    return TOOL_FLAGS[tool]


def command_flags(command):
    """``(tool, flag)`` for each ``--flag`` of a command line: a flag belongs to
    the last tool named before it in the same ``&&`` / ``;`` / ``|`` segment."""
    found = []
    for segment in re.split(r"&&|;|\|\|?", command):
        tool = None
        position = 0
        for match in FLAG.finditer(segment):
            for named in TOOL.finditer(segment, position, match.start()):
                tool = named.group(1)
            position = match.start()
            found.append((tool, match.group(1)))
    return found


def flag_mentions(text, flagfile=False):
    """``(line number, tool, flag)`` for every ``--flag`` in a Markdown text or
    a flagfile: in fenced code blocks by command (continuation lines joined), in
    inline code spans (which may wrap) by span, flagfile lines as bin/train's,
    a flagfile comment line as one command text, and bare in prose (tool unknown)."""
    mentions = []
    prose = []  # the text outside code blocks, code blocks blanked (same line numbers)
    in_block = False
    command, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            prose.append("")
            continue
        if in_block:
            prose.append("")
            if not command:
                start = number
            command += " " + line.rstrip().rstrip("\\")
            if not line.rstrip().endswith("\\"):
                mentions += [(start, tool, flag) for tool, flag in command_flags(command)]
                command = ""
            continue
        if flagfile and line.startswith("--"):  # a flag line
            mentions.append((number, "bin/train", FLAG.match(line).group(1)))
            prose.append("")
        elif flagfile and line.startswith("#"):  # a comment: its own command text
            mentions += [(number, tool, flag) for tool, flag in command_flags(line)]
            prose.append("")
        else:
            prose.append(line)
    body = "\n".join(prose)

    def line_of(offset):
        return body.count("\n", 0, offset) + 1

    for span in BACKTICKS.finditer(body):
        mentions += [(line_of(span.start()), tool, flag)
                     for tool, flag in command_flags(span.group(1).replace("\n", " "))]
    rest = BACKTICKS.sub(lambda m: " " * len(m.group(0)), body)
    mentions += [(line_of(m.start()), None, m.group(1)) for m in FLAG.finditer(rest)]
    return mentions


def documents():
    paths = [REPO / "README.md", REPO / "BUILD_NOTES.md"]
    paths += sorted((REPO / "docs").glob("*.md"))
    paths += sorted((REPO / "experiments").rglob("*.flags"))
    return [path for path in paths if path.is_file()]


def unknown_flags(text, known, flagfile=False):
    bad = []
    for number, tool, flag in flag_mentions(text, flagfile):
        allowed = allowed_for(tool, known)
        if flag not in allowed:
            bad.append((number, tool or "bin/train or bin/evaluate", flag))
    return bad


def test_flag_check_catches_a_wrong_flag(known_flags):
    text = ("Run `bin/train --flagfile=f --epochs=2 --no_such_flag=1` and\n"
            "```bash\nbin/evaluate --model_path=r \\\n  --epsilon=0.1 --epochs=3\n```\n"
            "`python bench/reproduce.py --seeds=0 --attacks=pgd`, then `--lr`.\n"
            "`pip install -q -e .` and `tensorboard --logdir runs/`, a wrapped `python\n"
            "bench/step_cost.py --model=mlp\n--modes=graph --lr=1`.\n")
    bad = {(tool, flag) for _, tool, flag in unknown_flags(text, known_flags)}
    assert bad == {("bin/train", "no_such_flag"), ("bin/evaluate", "epochs"),
                   ("bench/reproduce.py", "attacks"), ("bench/step_cost.py", "lr")}
    flagfile = "# bin/train --flagfile=x --seed=1 --sede=2\n--dataset=mnist\n--datset=mnist\n"
    bad = {(tool, flag) for _, tool, flag in unknown_flags(flagfile, known_flags, True)}
    assert bad == {("bin/train", "sede"), ("bin/train", "datset")}


def test_every_flag_named_in_the_documents_exists(known_flags):
    bad = []
    for path in documents():
        bad += [f"{path.relative_to(REPO)}:{n}: --{flag} is not a flag of {tool}"
                for n, tool, flag in unknown_flags(path.read_text(), known_flags,
                                                   path.suffix == ".flags")]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------
# (c) Flagfiles and documents named exist
# ----------------------------------------------------------------------------
FLAGFILE = re.compile(r"\bexperiments/[\w/]+\.flags\b")
LOCAL_DOC = re.compile(r"(?<![\w/.])((?:docs|examples|bench|tests|bin)/[\w./\-]+\.(?:md|py|png)"
                       r"|(?:README|BUILD_NOTES|CHANGELOG)\.md|bin/(?:train|evaluate)\b)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def missing_paths(path, text):
    missing = set()
    for name in FLAGFILE.findall(text) + LOCAL_DOC.findall(text):
        if not (REPO / name).exists():
            missing.add(name)
    for target in MARKDOWN_LINK.findall(text):
        if "://" not in target and not target.startswith("mailto:"):
            if not (path.parent / target).exists():
                missing.add(target)
    return sorted(missing)


def test_the_path_check_catches_a_missing_file():
    text = ("`experiments/nope.flags`, experiments/quickstart.flags, docs/GONE.md, "
            "[notes](BUILD_NOTES.md), [x](nothing_here.md), [web](https://example.com)")
    assert missing_paths(REPO / "README.md", text) == [
        "docs/GONE.md", "experiments/nope.flags", "nothing_here.md"]


def test_every_flagfile_and_document_named_exists():
    bad = []
    for path in documents():
        bad += [f"{path.relative_to(REPO)}: {name} does not exist"
                for name in missing_paths(path, path.read_text())]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------
# Flagfile headers
# ----------------------------------------------------------------------------
def test_flagfile_headers_are_short_and_name_no_repository_data_folder():
    bad = []
    for path in sorted((REPO / "experiments").rglob("*.flags")):
        lines = path.read_text().splitlines()
        comments = [line for line in lines if line.startswith("#")]
        if len(comments) > 8:
            bad.append(f"{path.relative_to(REPO)}: {len(comments)} comment lines (> 8)")
        if any(line.startswith("--data_dir=") for line in lines):
            bad.append(f"{path.relative_to(REPO)}: sets --data_dir")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------
# (d) The example runs
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_custom_method_example_runs():
    pytest.importorskip("tensorflow")
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "custom_method.py"), "--synthetic"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "trained goodfellow_at" in result.stdout
    assert "custom method example: OK" in result.stdout


# ----------------------------------------------------------------------------
# The API reference (pdoc, the `docs` extra) builds without a warning
# ----------------------------------------------------------------------------
API_DOCS = """
import pathlib, sys, warnings
import pdoc
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc(*sys.argv[2:], output_directory=pathlib.Path(sys.argv[1]))
bad = [w for w in caught if "pdoc" in w.filename]
for w in bad:
    print(f"pdoc: {w.message}")
sys.exit(1 if bad else 0)
"""


def build_api_reference(out, *modules):
    pytest.importorskip("pdoc")
    return subprocess.run([sys.executable, "-c", API_DOCS, str(out), *modules],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow  # imports every module (TensorFlow) in a subprocess
def test_api_reference_builds(tmp_path):
    proc = build_api_reference(tmp_path, "tf_backsmooth")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in ("tf_backsmooth.html", "tf_backsmooth/robust_model.html",
                 "tf_backsmooth/methods.html", "tf_backsmooth/attacks.html"):
        assert (tmp_path / page).is_file(), page
    text = (tmp_path / "tf_backsmooth" / "robust_model.html").read_text()
    assert "class RobustModel" in text or "RobustModel" in text
    # The check can fail: a module that does not import, and an annotation
    # that names nothing, are both reported.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken_doc.py").write_text(
        '"""A module."""\n\ndef f(x: "NoSuchType") -> int:\n    """Returns 1."""\n    return 1\n')
    bad = subprocess.run([sys.executable, "-c", API_DOCS, str(tmp_path / "out"),
                          str(tmp_path / "src" / "broken_doc.py")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 1 and "NoSuchType" in bad.stdout, bad.stdout + bad.stderr


def test_ci_runs_exactly_the_readmes_test_command():
    """.ci/run's last line is the README's second command, character for character."""
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    commands = [b.strip() for b in blocks if "apt-get" in b]
    assert len(commands) == 2, commands
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip()][-1]
    assert ci.strip() == commands[1]
    assert "python3 -m venv .venv" in commands[0] and "python3 -m venv .venv" in commands[1]
