"""Robustness against compute: the curve's schedule, its time left out of the
training time, and bench/robustness_vs_compute.py on run directories."""

import json
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import REPO

from tf_backsmooth import callbacks as cb
from tf_backsmooth.robust_model import RobustModel


def test_curve_points_every_k_epochs_and_after_the_last():
    curve = cb.ComputeCurve(None, None, 0.1, every=3, total_epochs=8)
    assert [e + 1 for e in range(8) if curve.due(e)] == [3, 6, 8]
    assert not any(cb.ComputeCurve(None, None, 0.1, 0, 8).due(e) for e in range(8))


def test_the_curves_own_time_is_not_training_time(tmp_path):
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = RobustModel(base, method="natural")
    model.compile(optimizer="sgd")
    model.fit(np.zeros((8, 4), np.float32), np.zeros(8, np.int64), epochs=1, verbose=0)
    runlog = cb.RunLog(str(tmp_path), 8)
    runlog.set_model(model)
    runlog.on_epoch_begin(0)
    time.sleep(0.3)
    logs = {"loss": 1.0, "curve_seconds": 0.25}
    runlog.on_epoch_end(0, logs)
    assert 0.04 <= logs["epoch_seconds"] < 0.25
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["curve_seconds"] == 0.25


def _fake_run(folder, method, epochs, curve_every, attempts=()):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": method, "model": "small_cnn",
                                                    "epsilon": 0.3, "seed": 0}))
    records = []
    for e in range(1, epochs + 1):
        record = {"epoch": e, "epoch_seconds": 10.0, "grad_evals": 1000.0 * e}
        if e % curve_every == 0:
            record.update(curve_autoattack_lite_accuracy=0.1 * e, curve_pgd_accuracy=0.1 * e,
                          curve_clean_accuracy=0.9)
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if attempts:
        (folder / "attempts.json").write_text(json.dumps(list(attempts)))


def test_bench_script_draws_and_tables_runs_with_failed_attempts_counted(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path / "bs", "backward_smoothing", 4, 2)
    _fake_run(tmp_path / "fgsm", "fgsm_rs", 2, 1,
              attempts=[{"train_seconds": 7.0, "grad_evals": 500.0, "seed": 0}])
    out, table = tmp_path / "curve.png", tmp_path / "curve.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "robustness_vs_compute.py"),
         f"--runs={tmp_path / 'bs'},{tmp_path / 'fgsm'}", "--labels=BS,FGSM-RS",
         f"--output={out}", f"--table={table}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000
    rows = [ln for ln in table.read_text().splitlines() if ln.startswith("| BS") or
            ln.startswith("| FGSM")]
    assert rows == [
        "| BS | backward_smoothing | 2 | 20 | 2e+03 | 20.0 | 20.0 | 90.0 |",
        "| BS | backward_smoothing | 4 | 40 | 4e+03 | 40.0 | 40.0 | 90.0 |",
        # the failed attempt's 7 s and 500 evaluations come first
        "| FGSM-RS | fgsm_rs | 1 | 17 | 1.5e+03 | 10.0 | 10.0 | 90.0 |",
        "| FGSM-RS | fgsm_rs | 2 | 27 | 2.5e+03 | 20.0 | 20.0 | 90.0 |"]
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "robustness_vs_compute.py"),
                          f"--runs={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no metrics.jsonl" in bad.stderr
