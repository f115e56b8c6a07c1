"""The per-CPU kernel choice (tf_backsmooth.cpu): the rules on given CPU
flags, what importing the package does to a fresh process, and the run
manifest's record."""

import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO

from tf_backsmooth import cpu
from tf_backsmooth import run_dir as run_dir_lib

VNNI = frozenset({"avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"})
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX = frozenset({"sse4_2", "avx"})


def test_the_users_setting_always_wins():
    for value, enabled in (("1", True), ("true", True), ("0", False), ("False", False),
                           ("maybe", None)):
        choice = cpu.decide_onednn({"TF_ENABLE_ONEDNN_OPTS": value}, AVX2, "Linux", "x86_64")
        assert (choice.enabled, choice.source) == (enabled, "user"), value
        assert f"TF_ENABLE_ONEDNN_OPTS={value}" in choice.reason


def test_rules_by_cpu_kind():
    on_vnni = cpu.decide_onednn({}, VNNI, "Linux", "x86_64")
    assert (on_vnni.enabled, on_vnni.source) == (True, "tensorflow")
    assert "avx512_vnni, avx512_bf16" in on_vnni.reason
    for flag in cpu.TF_ONEDNN_FLAGS:  # any one of TensorFlow's own triggers
        assert cpu.decide_onednn({}, AVX2 | {flag}, "Linux", "x86_64").source == "tensorflow"
    on_avx2 = cpu.decide_onednn({}, AVX2, "Linux", "x86_64")
    assert (on_avx2.enabled, on_avx2.source) == (True, "tf_backsmooth")
    assert "measured" in on_avx2.reason
    assert cpu.decide_onednn({}, AVX2 - {"fma"}, "Linux", "x86_64").source == "tensorflow"
    old = cpu.decide_onednn({}, AVX, "Linux", "x86_64")
    assert (old.enabled, old.source) == (False, "tensorflow") and "AVX CPU" in old.reason
    for system, machine, flags in (("Darwin", "x86_64", AVX2), ("Linux", "aarch64", AVX2),
                                   ("Windows", "AMD64", AVX2), ("Linux", "x86_64", None)):
        choice = cpu.decide_onednn({}, flags, system, machine)
        assert (choice.enabled, choice.source) == (None, "tensorflow"), (system, machine)


def test_isa_and_cpuinfo_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: x\nflags\t\t: fpu avx avx2 fma\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_flags(str(info)) == {"fpu", "avx", "avx2", "fma"}  # the first line
    assert cpu.cpu_flags(str(tmp_path / "missing")) is None
    assert [cpu.isa(f) for f in (VNNI, AVX2, AVX, frozenset({"sse2"}), None)] == [
        "AVX-512", "AVX2", "AVX", "SSE", "unknown"]
    assert cpu.isa(VNNI | {"amx_tile"}) == "AMX"


def test_bfloat16_policy_warns_on_a_cpu_without_bfloat16_units(tmp_path):
    """The bfloat16 units come from the cpuinfo flags line; mixed_bfloat16 on
    a CPU reporting none warns (with the benchmark to run), not when it
    reports one, not for other policies, on an accelerator, or when unknown."""
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu.bfloat16_units(cpu.cpu_flags(str(amx))) == ["amx_bf16", "avx512_bf16"]
    assert cpu.bfloat16_units(cpu.cpu_flags(str(plain))) == []
    assert cpu.bfloat16_units(cpu.cpu_flags(str(tmp_path / "missing"))) is None
    warning = cpu.bfloat16_warning("mixed_bfloat16", [], None)
    assert "no bfloat16 units" in warning and "--precisions=float32,bfloat16" in warning
    assert cpu.bfloat16_warning("mixed_bfloat16", ["amx_bf16"], None) is None
    assert cpu.bfloat16_warning("float32", [], None) is None
    assert cpu.bfloat16_warning("mixed_bfloat16", [], "GPU") is None
    assert cpu.bfloat16_warning("mixed_bfloat16", None, None) is None


def _fresh(code, tmp_path, flags, **env):
    """Runs ``code`` in a new Python whose CPU reports ``flags``."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: " + " ".join(sorted(flags)) + "\n")
    full = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    full.update(TF_BACKSMOOTH_CPUINFO=str(info), TF_CPP_MIN_LOG_LEVEL="2", **env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SHOW = ("import os, tf_backsmooth; "
        "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS', '<unset>'))")


@pytest.mark.parametrize("flags,env,expected", [
    (AVX2, {}, "1"),                                    # set by the package
    (AVX2, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "0"),        # the user's choice stays
    (VNNI, {}, "<unset>"),                              # TensorFlow turns it on itself
    (AVX, {}, "<unset>"),                               # not measured: TF's default
])
def test_importing_the_package_first_sets_the_choice(tmp_path, flags, env, expected):
    assert _fresh(SHOW, tmp_path, flags, **env).stdout.split() == [expected]


def test_the_choice_reaches_tensorflow(tmp_path):
    """On an 'AVX2' CPU TensorFlow then really runs oneDNN (this machine's
    real CPU leaves that to the environment variable, which the package set);
    with the user's 0 it really does not."""
    code = ("import tf_backsmooth, tensorflow; from tf_backsmooth import cpu; "
            "print(cpu.onednn_in_use(), cpu.choose().source)")
    assert _fresh(code, tmp_path, AVX2).stdout.split() == ["True", "tf_backsmooth"]
    off = _fresh(code, tmp_path, AVX2, TF_ENABLE_ONEDNN_OPTS="0")
    assert off.stdout.split() == ["False", "user"]


def test_tensorflow_loaded_first_with_the_slower_choice_says_how_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_CHOICE", None)
    monkeypatch.setattr(cpu, "_WARNED", False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda *a: AVX2)
    monkeypatch.setattr(cpu, "onednn_in_use", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    env = {}
    with caplog.at_level(logging.WARNING, logger="tf_backsmooth"):
        choice = cpu.choose(env)
        monkeypatch.setattr(cpu, "_CHOICE", None)
        cpu.choose(env)
    assert env == {}  # too late to set: TensorFlow is loaded
    assert (choice.enabled, choice.source) == (False, "tensorflow")
    warnings = [r.getMessage() for r in caplog.records if "oneDNN" in r.getMessage()]
    assert len(warnings) == 1 and "TF_ENABLE_ONEDNN_OPTS=1" in warnings[0]
    assert "import tf_backsmooth before TensorFlow" in warnings[0]


def test_manifest_records_the_cpu_kernels():
    import keras

    from tf_backsmooth import config as config_lib
    from tf_backsmooth.robust_model import RobustModel

    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = RobustModel(base, epsilon=0.1)
    entry = run_dir_lib.manifest(config_lib.TrainConfig(), model, "default", 1)["cpu_kernels"]
    flags = cpu.cpu_flags()
    assert entry["isa"] == cpu.isa(flags)
    assert set(entry["flags"]) <= set(cpu.REPORTED_FLAGS) and set(entry["flags"]) <= flags
    assert entry["onednn"]["in_use"] in (True, False)
    assert entry["onednn"]["by"] in ("user", "tensorflow", "tf_backsmooth")
    assert entry["onednn"]["chosen"] is cpu.choose().enabled


# The exactness tests (hand-computed updates, float64 references) and the
# 1-vs-2 replica equivalence, run again with TensorFlow's other kernel library.
FLIPPED = ["tests/test_methods.py::test_one_fit_step_equals_hand_computed_update",
           "tests/test_distribute.py::test_two_replicas_match_one_device",
           "tests/test_fastgrad.py", "tests/test_fused_bn.py"]


@pytest.mark.slow  # a pytest subprocess over the exactness and replica tests
def test_exactness_and_replica_tests_hold_with_the_other_kernel_library():
    used = cpu.onednn_in_use()
    assert used in (True, False)
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0" if used else "1",
               TF_CPP_MIN_LOG_LEVEL="2")
    check = subprocess.run(
        [sys.executable, "-c", "import tf_backsmooth, tensorflow; from tf_backsmooth import "
         "cpu; print(cpu.onednn_in_use())"], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=300)
    assert check.stdout.split() == [str(not used)], check.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *FLIPPED], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
