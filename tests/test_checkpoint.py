"""Checkpoints on real Orbax directories: round trip, what is kept, damaged steps, the stock-Orbax
recipe, and the resume rules of the CLI (those that need no training)."""

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from bitnet_jax import checkpoint as ck
from bitnet_jax import run_dir as rd
from bitnet_jax.damage import damage_reason
from bitnet_jax import config as config_lib
from bitnet_jax import resume as resume_lib
from bitnet_jax import sharding, train_state

TINY = {
    "model": {"vocab_size": 300, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 32},
    "train": {"steps": 20, "batch_size": 2, "seq_len": 16},
    "optim": {"warmup_steps": 2},
    "tokenizer": {"builtin_vocab_size": 300},
    "checkpoint": {"every": 5, "keep_last": 2},
}


def tiny_cfg(**sections):
    data = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_lib.from_dict(data)


class Counter:
    """A resumable: anything with state_dict() / load_state_dict()."""

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, d):
        self.n = d["n"]


@pytest.fixture(scope="module")
def placed():
    cfg = tiny_cfg()
    mesh = sharding.make_mesh(cfg.mesh)
    _, state = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state, mesh)
    # distinct, non-trivial optimizer moments and step, so the round trip proves something
    state = state.replace(step=state.step + 7,
                          opt_state=jax.tree.map(lambda x: x + (0.5 if x.dtype.kind == "f" else 3), state.opt_state))
    return cfg, mesh, state, shardings


def save_steps(run_dir, cfg, state, steps, data_state=None):
    mngr = ck.CheckpointManager(run_dir, cfg)
    for s in steps:
        mngr.save(s, state, data_state=data_state or {"pos": s}, resumables={"counter": Counter(s)})
    mngr.close()


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_save_then_restore_returns_identical_state_data_and_meta(tmp_path, placed):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [7], data_state={"position": [1, 2], "skip_tokens": 3})
    _, abstract = train_state.abstract_state(cfg)
    mngr = ck.CheckpointManager(tmp_path, cfg, read_only=True)
    restored, (data_state,), meta = mngr.restore(7, abstract, shardings)
    mngr.close()
    assert leaves_equal(restored, state)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    assert restored.params["embed_tokens"][...].sharding == shardings.params["embed_tokens"].get_value()
    assert data_state == {"position": [1, 2], "skip_tokens": 3}
    assert meta["step"] == 7 and meta["tokens_seen"] == 7 * 2 * 16
    assert meta["resumables"] == {"counter": {"n": 7}}
    assert config_lib.from_dict(meta["config"]) == cfg


def test_load_params_gives_config_model_params_and_step(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    got_cfg, params, step = ck.load_params(tmp_path)
    assert (got_cfg, step) == (cfg, 10)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(state.params)
    assert leaves_equal(params, state.params)
    assert ck.load_params(tmp_path, 5)[2] == 5


def test_orbax_deletes_what_the_policy_drops(tmp_path, placed):
    cfg = tiny_cfg(train={"steps": 12}, optim={"stage_switch": 8, "warmup_steps": 2})
    _, _, state, _ = placed
    save_steps(tmp_path, cfg, state, range(1, 13))
    # every 5: 5, 10; mandatory: 7, 8 (stage switch) and 12 (final); newest two others: 9, 11
    assert rd.complete_steps(tmp_path) == [5, 7, 8, 9, 10, 11, 12]
    assert rd.mandatory_steps(cfg) == [7, 8, 12]
    assert [s for s in range(1, 13) if rd.is_save_step(cfg, s)] == [5, 7, 8, 10, 12]


def resave_with(run_dir, cfg, state, steps):
    """What a run resumed in place with ``cfg`` does: a new writer on the same folder saves ``steps``."""
    save_steps(run_dir, cfg, state, steps)
    return rd.complete_steps(run_dir)


def test_resume_with_another_every_keeps_the_old_permanent_steps(tmp_path, placed):
    _, _, state, _ = placed
    every2 = tiny_cfg(train={"steps": 100}, checkpoint={"every": 2, "keep_last": 1, "async_save": False})
    save_steps(tmp_path, every2, state, [2, 4, 6, 7])
    assert rd.complete_steps(tmp_path) == [2, 4, 6, 7]
    assert [rd.read_meta(tmp_path / "checkpoints" / str(s))["permanent"] for s in (2, 4, 6, 7)] == [
        True, True, True, False]
    every5 = tiny_cfg(train={"steps": 100}, checkpoint={"every": 5, "keep_last": 1, "async_save": False})
    # 2, 4, 6 were every-N steps when saved: still kept; 7 is the newest other step; 10 every-N now
    assert resave_with(tmp_path, every5, state, [10]) == [2, 4, 6, 7, 10]
    # the next saves drop only the steps that were never permanent (7, then 11)
    assert resave_with(tmp_path, every5, state, [11, 12]) == [2, 4, 6, 10, 12]


def test_steps_saved_without_the_permanent_flag_use_their_stored_config(tmp_path, placed):
    _, _, state, _ = placed
    every2 = tiny_cfg(train={"steps": 100}, checkpoint={"every": 2, "keep_last": 1, "async_save": False})
    save_steps(tmp_path, every2, state, [2, 3, 4])
    for s in (2, 3, 4):  # as written before meta["permanent"] existed
        path = tmp_path / "checkpoints" / str(s) / "meta" / "metadata"
        meta = json.loads(path.read_text())
        del meta["permanent"]
        path.write_text(json.dumps(meta))
    assert rd.permanent_steps(tmp_path) == [2, 4]
    every5 = tiny_cfg(train={"steps": 100}, checkpoint={"every": 5, "keep_last": 0, "async_save": False})
    assert resave_with(tmp_path, every5, state, [6]) == [2, 4, 6]


def damage(step_dir: Path, how: str) -> None:
    if how == "unfinished":  # what a kill -9 during the write leaves: Orbax's tmp folder
        step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp-123"))
    elif how == "no_commit":
        (step_dir / rd.COMMIT_FILE).unlink()
    elif how == "meta_missing":
        (step_dir / "meta" / "metadata").unlink()
    elif how == "meta_truncated":
        path = step_dir / "meta" / "metadata"
        path.write_bytes(path.read_bytes()[:20])
    elif how == "array_truncated":
        data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                   key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "array_deleted":  # an array data file of the OCDBT database
        for p in (step_dir / "state").glob("ocdbt.process_*/d/*"):
            p.unlink()
    elif how == "manifest_garbled":
        garble(step_dir / "state" / "manifest.ocdbt", 8)
    elif how == "btree_garbled":  # the b-tree nodes (tensorstore: INVALID_ARGUMENT, no status prefix)
        for p in (step_dir / "state" / "d").iterdir():
            garble(p, 64, at=0.1)
    elif how == "array_metadatas_garbled":
        for p in (step_dir / "state" / "array_metadatas").iterdir():
            p.write_text("{not json")
    else:
        raise ValueError(how)


def garble(path: Path, n: int, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["unfinished", "no_commit", "meta_missing", "meta_truncated"])
def test_latest_skips_an_incomplete_step_with_a_warning_naming_it(tmp_path, placed, how):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    damage(tmp_path / "checkpoints" / "10", how)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, step = ck.load_params(tmp_path)
    assert step == 5
    if how != "unfinished":  # a tmp folder is not a step at all: nothing to warn about
        assert any(str(tmp_path / "checkpoints" / "10") in str(w.message) for w in caught)
        with pytest.raises(rd.CheckpointError, match="incomplete or damaged"):
            ck.load_params(tmp_path, 10)


def test_latest_skips_a_step_whose_array_file_is_truncated(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    damage(tmp_path / "checkpoints" / "10", "array_truncated")
    with pytest.warns(UserWarning, match=r"checkpoints/10"):
        assert ck.load_params(tmp_path)[2] == 5
    with pytest.raises(rd.CheckpointError, match=r"checkpoints/10 is damaged"):
        ck.load_params(tmp_path, 10)


@pytest.mark.parametrize("how", ["array_truncated", "array_deleted", "manifest_garbled", "btree_garbled",
                                 "array_metadatas_garbled"])
def test_damage_that_only_reading_finds_raises_checkpoint_damaged(tmp_path, placed, how):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [5])
    damage(tmp_path / "checkpoints" / "5", how)
    assert rd.inspect_step(tmp_path / "checkpoints" / "5").problem is None  # structurally complete
    _, abstract = train_state.abstract_state(cfg)
    mngr = ck.CheckpointManager(tmp_path, cfg, read_only=True)
    with pytest.raises(rd.CheckpointDamaged, match=r"checkpoints/5 is damaged"):
        mngr.restore(5, abstract, shardings)
    mngr.close()


def test_damage_reason_tells_damage_from_other_errors(tmp_path):
    def wrapped(inner, outer=Exception):  # how Orbax wraps an array read error
        try:
            try:
                raise inner
            except BaseException:
                raise outer("Encountered error while reading array index")
        except BaseException as e:
            return e

    damaged = [ValueError("DATA_LOSS: Error decoding local file"), ValueError("NOT_FOUND: ... does not exist"),
               ValueError("OUT_OF_RANGE: Requested byte range [1, 9) is not valid for value of size 4"),
               ValueError("Error reading \"x/.zarray\": Error decoding b-tree node: ZSTD_decompressStream() "
                          "failed: Data corruption detected"),
               json.JSONDecodeError("Expecting value", "", 0), FileNotFoundError("meta/metadata not found"),
               wrapped(ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream; at byte 0"))]
    healthy = [RuntimeError("RESOURCE_EXHAUSTED: Out of memory"), ValueError("RESOURCE_EXHAUSTED: cache"),
               ValueError("UNAVAILABLE: try again"), ValueError("PERMISSION_DENIED: Error decoding"),
               ValueError("sharding mismatch"), PermissionError("denied"), MemoryError(), KeyError("x"),
               wrapped(ValueError("DATA_LOSS: x"), outer=RuntimeError)]
    assert all(damage_reason(e, tmp_path) for e in damaged)
    assert not any(damage_reason(e, tmp_path) for e in healthy)
    # a step that is gone altogether was moved, not damaged
    assert damage_reason(damaged[0], tmp_path / "gone") is None


def fail_restore(monkeypatch, first_only=False):
    """Makes Orbax's restore raise an out-of-memory error (always, or only on the first call)."""
    import orbax.checkpoint as ocp

    calls = []
    orig = ocp.CheckpointManager.restore

    def restore(self, *args, **kwargs):
        calls.append(1)
        if not first_only or len(calls) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    return calls


@pytest.mark.parametrize("first_only", [True, False])
def test_an_error_that_is_not_damage_surfaces_and_moves_nothing(tmp_path, placed, monkeypatch, first_only):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    calls = fail_restore(monkeypatch, first_only)
    target = resume_lib.ResumeTarget(tmp_path, None, new_run=False)
    _, abstract = train_state.abstract_state(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED") as info:
            resume_lib.restore(target, 10, abstract, shardings)
    assert not isinstance(info.value, rd.CheckpointError)
    assert any("checkpoints/10" in note and "left in place" in note for note in info.value.__notes__)
    assert len(calls) == 1  # no fallback to an older step
    assert rd.complete_steps(tmp_path) == [5, 10]
    assert not (tmp_path / "damaged_checkpoints").exists()
    assert not [w for w in caught if "skipping" in str(w.message) or "moved" in str(w.message)]


def test_load_params_surfaces_an_error_that_is_not_damage(tmp_path, placed, monkeypatch):
    import orbax.checkpoint as ocp

    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])

    def restore(self, *args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", restore)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping" warning: nothing falls back
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED") as info:
            ck.load_params(tmp_path)
    # generate and export read through load_params: the advice must not be to resume
    (note,) = info.value.__notes__
    assert "checkpoints/10" in note and "left in place" in note and "run the command again" in note
    assert "resume" not in note


def test_resume_falls_back_at_most_one_damaged_step(tmp_path, placed):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [5, 10, 15])
    damage(tmp_path / "checkpoints" / "15", "array_truncated")
    damage(tmp_path / "checkpoints" / "10", "array_truncated")
    target = resume_lib.ResumeTarget(tmp_path, None, new_run=False)
    _, abstract = train_state.abstract_state(cfg)
    with pytest.warns(UserWarning, match=r"checkpoints/15"):
        with pytest.raises(rd.CheckpointDamaged, match=r"checkpoints/10 is damaged.*second damaged step.*"
                                                       r"--resume .*checkpoints/STEP --run-id NEW_ID.*\[5\]"):
            resume_lib.restore(target, 15, abstract, shardings)
    # only the first damaged step was moved; 10 stays for the user to judge; 5 untouched
    assert rd.complete_steps(tmp_path) == [5, 10]
    assert [p.name.split(".")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["15"]

    # load_params (read-only) gives up after one fallback too, and moves nothing
    other = tmp_path / "other"
    save_steps(other, cfg, state, [5, 10, 15])
    damage(other / "checkpoints" / "15", "array_truncated")
    damage(other / "checkpoints" / "10", "array_truncated")
    with pytest.warns(UserWarning, match=r"checkpoints/15"):
        with pytest.raises(rd.CheckpointDamaged, match=r"checkpoints/10 is damaged.*checkpoints/15 is damaged "
                                                       r"too.*older complete steps: \[5\]"):
            ck.load_params(other)
    assert rd.complete_steps(other) == [5, 10, 15]


def test_an_explicit_damaged_step_is_never_replaced(tmp_path, placed):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    damage(tmp_path / "checkpoints" / "10", "array_truncated")
    _, abstract = train_state.abstract_state(cfg)
    with pytest.raises(rd.CheckpointDamaged, match=r"checkpoints/10 is damaged"):
        resume_lib.restore(resume_lib.ResumeTarget(tmp_path, 10, new_run=False), 10, abstract, shardings)
    assert rd.complete_steps(tmp_path) == [5, 10] and not (tmp_path / "damaged_checkpoints").exists()


def test_resume_of_a_truncated_latest_falls_back_and_moves_it_aside(tmp_path, placed):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    damage(tmp_path / "checkpoints" / "10", "array_truncated")
    target = resume_lib.ResumeTarget(tmp_path, None, new_run=False)
    _, abstract = train_state.abstract_state(cfg)
    with pytest.warns(UserWarning, match=r"checkpoints/10"):
        restored = resume_lib.restore(target, 10, abstract, shardings)
    assert restored.step == 5 and leaves_equal(restored.state, state)
    assert rd.complete_steps(tmp_path) == [5]  # 10 will be saved again by the continued run
    assert [p.name.split(".")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["10"]


def test_shape_mismatch_names_the_first_differing_parameter(tmp_path, placed):
    cfg, mesh, state, _ = placed
    save_steps(tmp_path, cfg, state, [5])
    wider = tiny_cfg(model={"intermediate_size": 96})
    _, abstract = train_state.abstract_state(wider)
    mngr = ck.CheckpointManager(tmp_path, wider, read_only=True)
    with pytest.raises(rd.CheckpointError, match=r"params\.layers\.0\.mlp\.down_proj\.weight is \(64, 32\)"):
        mngr.restore(5, abstract)
    mngr.close()


def readme_orbax_recipe() -> str:
    """The README's "Reading a checkpoint with Orbax alone" code block."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("Reading a checkpoint with Orbax alone"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]


def test_stock_orbax_reads_the_params_without_this_project(tmp_path, placed):
    """The README recipe, run in a fresh interpreter that never imports bitnet_jax, with the step
    directory given relative to the working directory."""
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5])
    recipe = readme_orbax_recipe()
    assert '"runs/<run_id>/checkpoints/600"' in recipe
    recipe = recipe.replace('"runs/<run_id>/checkpoints/600"', '"checkpoints/5"') + textwrap.dedent("""
        import sys
        import numpy as np
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
        assert "bitnet_jax" not in sys.modules
        w = params["layers"]["0"]["mlp"]["down_proj"]["weight"]
        np.save("down_proj.npy", np.asarray(w))
        print(json.dumps({"step": int(state["step"]), "meta_step": meta["step"],
                          "hidden": config["model"]["hidden_size"]}))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", recipe], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    w = np.asarray(state.params["layers"][0]["mlp"]["down_proj"]["weight"][...])
    assert got == {"step": 7, "meta_step": 5, "hidden": 32}
    np.testing.assert_array_equal(np.load(tmp_path / "down_proj.npy"), w)


# --------------------------------------------------------------------------- resume rules (no training)

def test_resume_target_forms(tmp_path, placed):
    cfg, _, state, _ = placed
    run = tmp_path / "runs" / "r1"
    save_steps(run, cfg, state, [5, 10])
    runs = str(tmp_path / "runs")
    assert resume_lib.parse_target("latest", runs, "r1") == resume_lib.ResumeTarget(run, None, False)
    assert resume_lib.parse_target("5", runs, "r1") == resume_lib.ResumeTarget(run, 5, False)
    assert resume_lib.parse_target(str(run), runs, None) == resume_lib.ResumeTarget(run, None, False)
    step_dir = str(run / "checkpoints" / "5")
    assert resume_lib.parse_target(step_dir, runs, "new") == resume_lib.ResumeTarget(run, 5, True)
    with pytest.raises(config_lib.ConfigError, match="add --run-id"):
        resume_lib.parse_target("latest", runs, None)
    with pytest.raises(config_lib.ConfigError, match="no checkpoints/ folder"):
        resume_lib.parse_target("latest", runs, "nope")
    with pytest.raises(config_lib.ConfigError, match="neither a run directory"):
        resume_lib.parse_target(str(tmp_path), runs, None)


def test_resume_may_change_intervals_but_refuses_math_keys(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5])
    target = resume_lib.ResumeTarget(tmp_path, None, False)
    step_dir = tmp_path / "checkpoints" / "5"
    ok = resume_lib.resolve_config(target, step_dir, None, ["eval.every=3", "checkpoint.every=2",
                                                            "log.progress=false"])
    assert (ok.eval.every, ok.checkpoint.every, ok.log.progress) == (3, 2, False)
    assert ok.model == cfg.model and ok.optim == cfg.optim
    with pytest.raises(config_lib.ConfigError, match=r"change train\.steps, optim\.peak_lr_1 of the resumed "
                                                      r"run .*only these may change: name, log\.\*, eval\.every"):
        resume_lib.resolve_config(target, step_dir, None, ["optim.peak_lr_1=0.1", "train.steps=30"])
    # a new run from a step directory may change anything
    new = resume_lib.resolve_config(resume_lib.ResumeTarget(tmp_path, 5, True), step_dir, None,
                                    ["optim.peak_lr_1=0.1"])
    assert new.optim.peak_lr_1 == 0.1


def test_new_run_from_a_checkpoint_of_another_shape_is_refused_before_writing(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path / "runs" / "r1", cfg, state, [5])
    step_dir = tmp_path / "runs" / "r1" / "checkpoints" / "5"
    with pytest.raises(rd.CheckpointError, match=r"params\.embed_tokens is \(300, 32\) float32 in the "
                                                 r"checkpoint but \(300, 64\)"):
        resume_lib.plan(resume_lib.parse_target(str(step_dir), str(tmp_path / "runs"), "r2"), None, ["model.hidden_size=64"], None)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"]


def test_changing_mesh_on_resume_notes_that_it_is_not_bit_for_bit(tmp_path, placed, capsys):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5])
    target = resume_lib.ResumeTarget(tmp_path, None, False)
    step_dir = tmp_path / "checkpoints" / "5"
    resume_lib.resolve_config(target, step_dir, None, ["eval.every=3"])
    assert "not to the bit" not in capsys.readouterr().err
    resume_lib.resolve_config(target, step_dir, None, ["mesh.fsdp=2", "model.attention=xla", "eval.every=3"])
    err = capsys.readouterr().err
    assert "model.attention, mesh.fsdp differ" in err and "exact in the math but not to the bit" in err


def incomplete_newer_step(tmp_path, cfg, state):
    save_steps(tmp_path, cfg, state, [5, 10])
    (tmp_path / "checkpoints" / "10" / rd.COMMIT_FILE).unlink()  # a save that never finished


def test_dry_run_names_incomplete_steps_without_moving_them(tmp_path, placed, capsys):
    from bitnet_jax.train_cli import main

    cfg, _, state, _ = placed
    incomplete_newer_step(tmp_path, cfg, state)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["--resume", str(tmp_path), "--dry-run"]) == 0
    assert re.search(r"would move the incomplete checkpoint .*checkpoints/10 \(no commit_success",
                     capsys.readouterr().err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    # the real plan moves it
    with pytest.warns(UserWarning, match=r"moved damaged checkpoint .*checkpoints/10"):
        resume_lib.plan(resume_lib.parse_target(str(tmp_path), str(tmp_path.parent), None), None, [], None)
    assert not (tmp_path / "checkpoints" / "10").exists()
    assert [p.name.split(".")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["10"]


def test_only_process_0_moves_damaged_steps(tmp_path, placed, monkeypatch):
    """Process 1 of a multi-process run (faked): decides the same step, moves nothing, meets process 0
    at the barrier. (tests/test_resume.py runs two real processes.)"""
    from jax.experimental import multihost_utils

    cfg, _, state, _ = placed
    incomplete_newer_step(tmp_path, cfg, state)
    barriers = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    cfg2, plan = resume_lib.plan(resume_lib.parse_target(str(tmp_path), str(tmp_path.parent), None), None, [], None)
    assert plan.step == 5  # the same decision as process 0 makes
    assert (tmp_path / "checkpoints" / "10").is_dir() and not (tmp_path / "damaged_checkpoints").exists()
    assert len(barriers) == 1
    # nothing to move (process 0 was faster): still at the barrier
    (tmp_path / "checkpoints" / "10").rename(tmp_path / "elsewhere")
    resume_lib.plan(resume_lib.parse_target(str(tmp_path), str(tmp_path.parent), None), None, [], None)
    assert len(barriers) == 2


def test_resume_from_an_older_step_in_place_is_refused(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    with pytest.raises(config_lib.ConfigError, match=r"overwrite them.*--resume .*checkpoints/5 --run-id"):
        resume_lib.plan(resume_lib.parse_target("5", str(tmp_path.parent), tmp_path.name), None, [], None)


def test_starting_a_run_dir_with_checkpoints_again_is_refused_before_writing(tmp_path, placed):
    from bitnet_jax.train_cli import main

    cfg, _, state, _ = placed
    run = tmp_path / "r1"
    save_steps(run, cfg, state, [5])
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    code = main(["--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                 "--runs-dir", str(tmp_path), "--run-id", "r1"])
    assert code == 2
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_stop_at_outside_the_run_is_refused():
    cfg = tiny_cfg()
    with pytest.raises(config_lib.ConfigError, match=r"--stop-at 30 must lie in \(0, 20\]"):
        resume_lib.check_stop_at(30, cfg)


def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, placed, monkeypatch):
    cfg, _, state, _ = placed
    mngr = ck.CheckpointManager(tmp_path, cfg)
    mngr.save(5, state, data_state={"pos": 5})
    mngr.wait()
    mngr.check_background_errors(6)  # a save that went well: nothing to report

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mngr._mngr, "save", disk_full)
    mngr.save(10, state, data_state={"pos": 10})
    mngr._pending.exception()  # wait for the background call to end (it failed)
    with pytest.raises(rd.CheckpointError, match=r"failed: No space left on device\. The run stopped at step 11; "
                                                  r"complete checkpoints: \[5\]\."):
        mngr.check_background_errors(11)
    mngr.close()
    assert rd.complete_steps(tmp_path) == [5]
