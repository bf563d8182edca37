"""The Makefile, run by real make in a copy of the repository's Makefile and pyproject.toml, with pip
replaced by `echo` and a stand-in interpreter: what each target installs, that an install made for
one target satisfies the next, and the train command line (resuming a run passes no --config)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def project(tmp_path) -> Path:
    for f in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / f, tmp_path / f)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "PYTHON $*"\n')  # prints the command it was given
    python.chmod(0o755)
    return tmp_path


def make(project: Path, *args: str) -> list[str]:
    out = subprocess.run(["make", "--no-print-directory", "PIP=echo PIP", *args], cwd=project,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [line.removeprefix("PIP install --quiet ") for line in lines if line.startswith("PIP install --quiet -e")]


def test_make_train_installs_the_runtime_dependencies_only(project):
    assert installs(make(project, "train")) == ["-e ."]
    assert installs(make(project, "train")) == []  # installed once


def test_make_test_after_make_train_adds_the_test_extra_and_train_then_installs_nothing(project):
    make(project, "train")
    assert installs(make(project, "test")) == ["-e .[test]"]
    assert installs(make(project, "train")) == []
    assert installs(make(project, "test")) == []


def test_make_test_first_satisfies_make_train(project):
    assert installs(make(project, "test")) == ["-e .[test]"]
    assert installs(make(project, "train")) == []


def test_a_changed_pyproject_reinstalls(project):
    make(project, "test")
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert installs(make(project, "train")) == ["-e ."]
    assert installs(make(project, "test")) == ["-e .[test]"]


def test_make_test_gguf_installs_the_gguf_extra_and_runs_the_gguf_tests(project):
    lines = make(project, "test-gguf")
    assert installs(lines) == ["-e .[test,gguf]"]
    assert any(line.startswith("PYTHON -m pytest -q -m gguf") for line in lines)
    assert installs(make(project, "test")) == [] and installs(make(project, "train")) == []


def _train_command(project: Path, *args: str) -> str:
    return next(line for line in make(project, "train", *args) if line.startswith("PYTHON train.py"))


def test_make_train_passes_the_config_unless_resuming(project):
    assert _train_command(project) == "PYTHON train.py --config configs/tiny.yaml"
    assert _train_command(project, "CONFIG=configs/bitnet_95m.yaml", "ARGS=--set train.steps=3") == \
        "PYTHON train.py --config configs/bitnet_95m.yaml --set train.steps=3"
    # A resumed run uses its stored config; a --config with another schedule would be refused.
    assert _train_command(project, "ARGS=--resume latest --run-id r1") == "PYTHON train.py --resume latest --run-id r1"
    assert _train_command(project, "ARGS=--resume runs/r1") == "PYTHON train.py --resume runs/r1"


def test_make_status_and_tensorboard_run_the_venvs_tools_on_the_run(project):
    status = [line for line in make(project, "status", "RUN=runs/r1", "ARGS=--json") if line.startswith("PYTHON")]
    assert status == ["PYTHON status.py runs/r1 --json"]
    tb = subprocess.run(["make", "--no-print-directory", "-n", "PIP=echo PIP", "tensorboard", "RUN=runs/r1"],
                        cwd=project, capture_output=True, text=True, timeout=60)
    assert tb.returncode == 0 and ".venv/bin/tensorboard --logdir runs/r1/tb" in tb.stdout
    missing = subprocess.run(["make", "--no-print-directory", "PIP=echo PIP", "status"], cwd=project,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "make status RUN=runs/<run_id>" in missing.stderr
