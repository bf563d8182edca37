"""A new run's folder (bitnet_jax/run_start.py): a start that fails before the run trained removes
what it wrote, and only that (issue 13, item 13); anything a run that trained leaves is kept. The
end-to-end case (a real train.py whose data fails) is in test_train_cli.py.
"""

from pathlib import Path

import pytest

from bitnet_jax import config as config_lib
from bitnet_jax import run_dir as rd
from bitnet_jax import run_start as rs
from test_run_dir import fake_step


def what_a_start_writes(root: Path, *, step_logged: bool = False) -> None:
    """config.yaml (prepare_run_dir), tokenizer/, dataset_fingerprint.json and tb/ with the start's
    layout event, and a train/ scalar once a step was logged."""
    from tensorboardX import SummaryWriter

    rs.prepare_run_dir(root, config_lib.from_dict({}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / "dataset_fingerprint.json").write_text("{}")
    with SummaryWriter(str(root / "tb")) as tb:
        tb.add_text("config", "name: tiny", 0)
        if step_logged:
            tb.add_scalar("train/loss", 8.3, 1)


def test_a_failed_start_removes_the_folder_and_the_parents_it_made(tmp_path):
    root = tmp_path / "runs" / "r"
    fresh = rs.NewRunFolder.before_start(root)
    assert (fresh.root, fresh.before, fresh.made) == (root, None, tmp_path / "runs")
    what_a_start_writes(root)
    assert rs.discard_failed_start(fresh) == f"removed {root}: the start failed before its first step and saved nothing"
    assert list(tmp_path.iterdir()) == []
    # a runs/ that held other runs before stays, with them
    (tmp_path / "runs" / "other").mkdir(parents=True)
    fresh = rs.NewRunFolder.before_start(root)
    what_a_start_writes(root)
    assert rs.discard_failed_start(fresh).startswith(f"removed {root}:")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["other"]


def test_a_failed_start_in_an_existing_folder_removes_only_what_it_wrote(tmp_path):
    root = tmp_path / "r"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "plan.txt").write_text("mine")
    fresh = rs.NewRunFolder.before_start(root)
    assert (fresh.before, fresh.made) == (frozenset({"notes"}), None)
    what_a_start_writes(root)
    assert rs.discard_failed_start(fresh) == (f"removed config.yaml, dataset_fingerprint.json, tb, tokenizer from {root}: "
                                              "the start failed before its first step and saved nothing")
    assert [p.name for p in root.iterdir()] == ["notes"] and (root / "notes" / "plan.txt").read_text() == "mine"


@pytest.mark.parametrize("trace", ["checkpoint", "save_begun", "damaged_step", "step_logged"])
def test_a_failure_after_a_save_or_a_logged_step_removes_nothing(tmp_path, trace):
    root = tmp_path / "runs" / "r"
    fresh = rs.NewRunFolder.before_start(root)
    what_a_start_writes(root, step_logged=trace == "step_logged")
    if trace == "checkpoint":
        fake_step(root, 5)
    elif trace == "save_begun":  # an asynchronous save that had not finished
        (root / "checkpoints" / "5.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    elif trace == "damaged_step":
        (fake_step(root, 5) / rd.COMMIT_FILE).unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert rs.discard_failed_start(fresh) is None
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
