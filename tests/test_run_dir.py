"""The run directory as files (bitnet_jax/run_dir.py): no jax or Orbax behind it, step folders read
once, the keep policy, and what a run without a checkpoint yet says. Real files, no Orbax saves
(tests/test_checkpoint.py saves real steps)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_jax import config as config_lib
from bitnet_jax import run_dir as rd
from bitnet_jax.console import command

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "orbax", "optax", "tensorstore")


@pytest.mark.parametrize("module", ["bitnet_jax.run_dir", "bitnet_jax.status"])
def test_importing_it_loads_neither_jax_nor_orbax(module):
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def fake_step(run_dir: Path, step: int, meta: dict | None = None) -> Path:
    """A step folder with the small files of a finished save (arrays are not read here)."""
    folder = run_dir / "checkpoints" / str(step)
    meta = {"format": rd.FORMAT, "step": step, "permanent": True} if meta is None else meta
    for name in (rd.COMMIT_FILE, "_CHECKPOINT_METADATA", f"{rd.STATE}/_METADATA", f"{rd.STATE}/manifest.ocdbt",
                 f"{rd.DATA}/metadata", f"{rd.META}/metadata"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(meta) if name.startswith(rd.META) else "{}")
    return folder


def test_a_scan_parses_each_json_file_of_each_step_once(tmp_path, monkeypatch):
    for step in (5, 10):
        fake_step(tmp_path, step)
    (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-17").mkdir()  # a save in progress: not a step
    parsed = []
    original = rd._parse_json
    monkeypatch.setattr(rd, "_parse_json", lambda path: parsed.append(path) or original(path))
    scan = rd.scan_steps(tmp_path)
    assert list(scan) == [5, 10] and all(s.problem is None for s in scan.values())
    assert scan[10].meta == {"format": rd.FORMAT, "step": 10, "permanent": True}
    assert len(parsed) == len(set(parsed)) == 2 * 4  # 4 JSON files per step, each once
    # what else reads the run works from that scan: no file is parsed again
    assert rd.complete_steps(tmp_path, scan=scan) == [5, 10]
    assert rd.permanent_steps(tmp_path, scan) == [5, 10]
    assert rd.resolve_step(tmp_path, None, scan) == 10
    assert len(parsed) == 8


def test_a_step_with_a_truncated_meta_file_is_named_and_skipped(tmp_path):
    fake_step(tmp_path, 5)
    (fake_step(tmp_path, 10) / rd.META / "metadata").write_text('{"step": ')
    assert (rd.inspect_step(tmp_path / "checkpoints" / "10").problem
            == "meta/metadata is truncated or corrupt (not valid JSON)")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*checkpoints/10: meta/metadata is truncated"):
        assert rd.resolve_step(tmp_path, None) == 5
    with pytest.raises(rd.CheckpointError, match=r"step 10 is not a complete checkpoint .*incomplete or damaged: "
                                                 r"meta/metadata is truncated.*available steps: 5"):
        rd.resolve_step(tmp_path, 10)
    with pytest.raises(rd.CheckpointError, match=r"step 7 is not a complete checkpoint .*no folder .*checkpoints/7\).*"
                                                 r"available steps: 5"):
        rd.resolve_step(tmp_path, 7)


def test_policy_keeps_mandatory_every_and_newest_others():
    policy = rd.KeepPolicy(every=5, keep_last=2, mandatory=[9, 20])

    class Info:
        def __init__(self, step):
            self.step = step

    steps = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    kept = [s for s, keep in zip(steps, policy.should_preserve([Info(s) for s in steps])) if keep]
    assert kept == [5, 9, 10, 12, 13]
    # keep_last=0 still never deletes the newest step (a SIGTERM save must survive)
    policy0 = rd.KeepPolicy(every=5, keep_last=0, mandatory=[])
    assert policy0.should_preserve([Info(4), Info(5), Info(7)]) == [False, True, True]
    # steps permanent under an earlier config (kept) stay, whatever the current every says
    policy_kept = rd.KeepPolicy(every=5, keep_last=0, mandatory=[], kept=[2, 4])
    assert policy_kept.should_preserve([Info(s) for s in (2, 3, 4, 5, 7)]) == [True, False, True, True, True]


def started_run(tmp_path: Path, **sections) -> Path:
    """What train.py leaves before its first save: config.yaml and an empty checkpoints/ folder."""
    data = {"train": {"steps": 20}, "optim": {"warmup_steps": 2}, "checkpoint": {"every": 5}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / rd.CONFIG_FILE).write_text(config_lib.dump(config_lib.from_dict(data)))
    return run


def test_a_run_without_a_checkpoint_yet_says_which_steps_will_have_one(tmp_path):
    run = started_run(tmp_path)  # every 5, stage switch at 10 (half of 20), 20 steps
    with pytest.raises(rd.CheckpointError) as info:
        rd.resolve_step(run, None)
    message = str(info.value)
    assert message == (f"{run} has no checkpoint yet: its run saves one every 5 steps (5, 10, ...), at the stage "
                       "switch (9 and 10) and at the end (20). If it is still running, wait for the first save; "
                       f"else start it afresh with {command('python', 'train.py', '--config', run / rd.CONFIG_FILE)} "
                       "--run-id NEW_ID, or name an older run to resume (--resume RUN_DIR)")
    assert "give a run directory made by train.py" not in message
    # checkpoint.every=0 and an explicit stage switch
    rerun = started_run(tmp_path / "b", checkpoint={"every": 0}, optim={"stage_switch": 15, "warmup_steps": 2})
    with pytest.raises(rd.CheckpointError, match=r"saves one at the stage switch \(14 and 15\) and at the end "
                                                 r"\(20\)\."):
        rd.resolve_step(rerun, 3)


def test_start_afresh_names_the_interpreter_that_runs(tmp_path, monkeypatch):
    """Issue 13, item 11: after `make train` (.venv/bin/python in the working directory) the printed
    command is .venv/bin/python train.py ..., which works without an activated venv."""
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path)
    run = started_run(tmp_path)
    with pytest.raises(rd.CheckpointError) as info:
        rd.resolve_step(Path("run"), None)
    assert (f"else start it afresh with .venv/bin/python train.py --config run/{rd.CONFIG_FILE} --run-id NEW_ID, "
            "or name an older run") in str(info.value)
    fake_step(run, 5, meta={"format": "other"})  # a damaged step only: the same advice
    (run / "checkpoints" / "5" / rd.COMMIT_FILE).unlink()
    with pytest.raises(rd.CheckpointError, match=r"holds no complete checkpoint \(incomplete or damaged: \[5\].*; "
                                                 r"start it afresh with \.venv/bin/python train\.py --config "), \
            pytest.warns(rd.CheckpointWarning, match="no commit_success.txt"):
        rd.resolve_step(run, None)


def test_a_folder_that_is_no_run_says_so(tmp_path):
    with pytest.raises(rd.CheckpointError, match=r"holds no complete checkpoint and no config.yaml: it is not a "
                                                 r"run directory made by train.py"):
        rd.resolve_step(tmp_path, None)
