"""The run directory's config.json: its schema version, and which runs resume."""

import json

import pytest

from tf_backsmooth import config as config_lib
from tf_backsmooth import run_dir


def _write(folder, payload):
    (folder / "config.json").write_text(json.dumps(payload))


def test_config_json_carries_its_schema_version():
    config = config_lib.TrainConfig(model_dir="runs/x")
    payload = run_dir.config_payload(config)
    assert payload["schema_version"] == run_dir.CONFIG_SCHEMA == 2


def test_an_older_layout_resumes_a_newer_one_is_refused_naming_both(tmp_path):
    config = config_lib.TrainConfig(model_dir=str(tmp_path))
    old = json.loads(json.dumps(run_dir.config_payload(config)))
    del old["schema_version"]  # what 0.1.0 wrote: no version
    _write(tmp_path, old)
    run_dir.prepare_model_dir(config)  # resumes
    newer = dict(old, schema_version=run_dir.CONFIG_SCHEMA + 1)
    _write(tmp_path, newer)
    with pytest.raises(run_dir.RunError, match=r"schema version 3; this tf_backsmooth reads "
                                               r"versions 1 to 2"):
        run_dir.prepare_model_dir(config)
    _write(tmp_path, dict(old, lr=0.5))
    with pytest.raises(run_dir.RunError, match=r"differs in: lr; config.json schema version 1, "
                                               r"this tf_backsmooth's 2"):
        run_dir.prepare_model_dir(config)
    _write(tmp_path, json.loads(json.dumps(run_dir.config_payload(config))))
    run_dir.prepare_model_dir(config)  # the current layout resumes too
