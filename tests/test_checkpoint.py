"""Checkpoints on real Orbax directories: round trip, what is kept, damaged steps, the stock-Orbax
recipe, and the resume rules of the CLI (those that need no training)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from bitnet_jax import checkpoint as ck
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


def test_policy_keeps_mandatory_every_and_newest_others():
    policy = ck.KeepPolicy(every=5, keep_last=2, mandatory=[9, 20])

    class Info:
        def __init__(self, step):
            self.step = step

    steps = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    kept = [s for s, keep in zip(steps, policy.should_preserve([Info(s) for s in steps])) if keep]
    assert kept == [5, 9, 10, 12, 13]
    # keep_last=0 still never deletes the newest step (a SIGTERM save must survive)
    policy0 = ck.KeepPolicy(every=5, keep_last=0, mandatory=[])
    assert policy0.should_preserve([Info(4), Info(5), Info(7)]) == [False, True, True]


def test_orbax_deletes_what_the_policy_drops(tmp_path, placed):
    cfg = tiny_cfg(train={"steps": 12}, optim={"stage_switch": 8, "warmup_steps": 2})
    _, _, state, _ = placed
    save_steps(tmp_path, cfg, state, range(1, 13))
    # every 5: 5, 10; mandatory: 7, 8 (stage switch) and 12 (final); newest two others: 9, 11
    assert ck.complete_steps(tmp_path) == [5, 7, 8, 9, 10, 11, 12]
    assert ck.mandatory_steps(cfg) == [7, 8, 12]
    assert [s for s in range(1, 13) if ck.is_save_step(cfg, s)] == [5, 7, 8, 10, 12]


def damage(step_dir: Path, how: str) -> None:
    if how == "unfinished":  # what a kill -9 during the write leaves: Orbax's tmp folder
        step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp-123"))
    elif how == "no_commit":
        (step_dir / ck.COMMIT_FILE).unlink()
    elif how == "meta_missing":
        (step_dir / "meta" / "metadata").unlink()
    elif how == "meta_truncated":
        path = step_dir / "meta" / "metadata"
        path.write_bytes(path.read_bytes()[:20])
    elif how == "array_truncated":
        data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                   key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


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
        with pytest.raises(ck.CheckpointError, match="incomplete or damaged"):
            ck.load_params(tmp_path, 10)


def test_latest_skips_a_step_whose_array_file_is_truncated(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    damage(tmp_path / "checkpoints" / "10", "array_truncated")
    with pytest.warns(UserWarning, match=r"checkpoints/10"):
        assert ck.load_params(tmp_path)[2] == 5
    with pytest.raises(ck.CheckpointError, match=r"checkpoints/10 is damaged"):
        ck.load_params(tmp_path, 10)


def test_resume_of_a_truncated_latest_falls_back_and_moves_it_aside(tmp_path, placed):
    cfg, _, state, shardings = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    damage(tmp_path / "checkpoints" / "10", "array_truncated")
    target = resume_lib.ResumeTarget(tmp_path, None, new_run=False)
    _, abstract = train_state.abstract_state(cfg)
    with pytest.warns(UserWarning, match=r"checkpoints/10"):
        restored = resume_lib.restore(target, 10, abstract, shardings)
    assert restored.step == 5 and leaves_equal(restored.state, state)
    assert ck.complete_steps(tmp_path) == [5]  # 10 will be saved again by the continued run
    assert [p.name.split(".")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["10"]


def test_shape_mismatch_names_the_first_differing_parameter(tmp_path, placed):
    cfg, mesh, state, _ = placed
    save_steps(tmp_path, cfg, state, [5])
    wider = tiny_cfg(model={"intermediate_size": 96})
    _, abstract = train_state.abstract_state(wider)
    mngr = ck.CheckpointManager(tmp_path, wider, read_only=True)
    with pytest.raises(ck.CheckpointError, match=r"params\.layers\.0\.mlp\.down_proj\.weight is \(64, 32\)"):
        mngr.restore(5, abstract)
    mngr.close()


def test_stock_orbax_reads_the_params_without_this_project(tmp_path, placed):
    """The README recipe, run in a fresh interpreter that never imports bitnet_jax."""
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5])
    recipe = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import orbax.checkpoint as ocp
        step_dir = {str(tmp_path / "checkpoints" / "5")!r}
        state = ocp.StandardCheckpointer().restore(step_dir + "/state")  # nested dicts of arrays
        params = state["params"]
        meta = json.load(open(step_dir + "/meta/metadata"))
        assert "bitnet_jax" not in sys.modules
        w = params["layers"]["0"]["mlp"]["down_proj"]["weight"]
        np.save("down_proj.npy", np.asarray(w))
        print(json.dumps({{"step": int(state["step"]), "meta_step": meta["step"],
                          "hidden": meta["config"]["model"]["hidden_size"]}}))
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
    with pytest.raises(ck.CheckpointError, match=r"params\.embed_tokens is \(300, 32\) float32 in the "
                                                 r"checkpoint but \(300, 64\)"):
        resume_lib.plan(str(step_dir), str(tmp_path / "runs"), "r2", None, ["model.hidden_size=64"], None)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"]


def test_resume_from_an_older_step_in_place_is_refused(tmp_path, placed):
    cfg, _, state, _ = placed
    save_steps(tmp_path, cfg, state, [5, 10])
    with pytest.raises(config_lib.ConfigError, match=r"overwrite them.*--resume .*checkpoints/5 --run-id"):
        resume_lib.plan("5", str(tmp_path.parent), tmp_path.name, None, [], None)


def test_starting_a_run_dir_with_checkpoints_again_is_refused_before_writing(tmp_path, placed):
    from bitnet_jax.train import main

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
