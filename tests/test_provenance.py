"""provenance.json: one record per start, appended on resume, with code, software and config identity."""

import hashlib
import json
import re

import jax
import pytest

from bitnet_jax import config as config_lib
from bitnet_jax.config import ConfigError
from bitnet_jax.provenance import PACKAGES, git_info, write_provenance


def test_first_start_writes_one_record_and_a_resume_appends(tmp_path):
    config_yaml = config_lib.dump(config_lib.from_dict({}))
    first = write_provenance(tmp_path, config_yaml)
    second = write_provenance(tmp_path, config_yaml, resumed_from_step=50)
    records = json.loads((tmp_path / "provenance.json").read_text())["records"]
    assert records == [first, second]
    assert first["resumed_from_step"] is None and second["resumed_from_step"] == 50
    assert first["config_sha256"] == hashlib.sha256(config_yaml.encode()).hexdigest()
    assert set(PACKAGES) <= set(first["packages"])
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "tensorboardX"):
        assert first["packages"][name], name  # all installed here
    assert first["packages"]["jax"] == jax.__version__
    assert first["devices"]["device_count"] == jax.device_count() and first["devices"]["process_count"] == 1
    assert first["devices"]["device_kinds"] == sorted({d.device_kind for d in jax.devices()})
    assert first["host"] and re.match(r"\d{4}-\d\d-\d\dT", first["start_time"])
    assert first["python"].count(".") == 2 and first["command"]


def test_git_identity_of_this_checkout():
    info = git_info()
    if info["commit"] is None:
        pytest.skip("not running from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"])
    assert isinstance(info["dirty"], bool)
    assert (info["diff_sha256"] is not None) == info["dirty"]


def test_a_foreign_provenance_file_is_not_overwritten(tmp_path):
    (tmp_path / "provenance.json").write_text('{"something": "else"}')
    with pytest.raises(ConfigError, match="not a provenance file"):
        write_provenance(tmp_path, "name: x\n")
    assert json.loads((tmp_path / "provenance.json").read_text()) == {"something": "else"}
