"""Config loading, overrides and the errors bad input gets."""

from pathlib import Path

import pytest

from bitnet_jax import config as C

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    tiny = C.load(CONFIGS / "tiny.yaml")
    big = C.load(CONFIGS / "bitnet_95m.yaml")
    assert tiny.name == "tiny" and big.name == "bitnet_95m"
    assert (big.model.hidden_size, big.model.num_hidden_layers, big.model.num_attention_heads) == (768, 12, 12)
    assert (big.train.steps, big.train.batch_size, big.train.seq_len, big.stage_switch) == (60000, 32, 1024, 30000)
    assert big.total_tokens == 1_966_080_000


def test_overrides_are_yaml_scalars():
    cfg = C.load(CONFIGS / "tiny.yaml", ["train.steps=80", "optim.peak_lr_1=2e-3", "model.hidden_act=silu",
                                          "optim.stage_switch=null", "log.prompts=[a, b]"])
    assert cfg.train.steps == 80 and cfg.optim.peak_lr_1 == 2e-3 and cfg.model.hidden_act == "silu"
    assert cfg.optim.stage_switch is None and cfg.stage_switch == 40
    assert cfg.log.prompts == ["a", "b"]


def test_unknown_key_names_valid_keys():
    with pytest.raises(C.ConfigError, match=r"unknown config key train\.stpes.*valid keys: steps, batch_size"):
        C.from_dict({"train": {"stpes": 10}})
    with pytest.raises(C.ConfigError, match=r"unknown config key modle.*valid keys: name, model"):
        C.from_dict({"modle": {}})


def test_wrong_type_names_key_and_type():
    with pytest.raises(C.ConfigError, match=r"train\.steps: expected int, got 'many'"):
        C.from_dict({"train": {"steps": "many"}})
    with pytest.raises(C.ConfigError, match=r"model\.hidden_act: expected 'relu2' \| 'silu'"):
        C.from_dict({"model": {"hidden_act": "gelu"}})
    with pytest.raises(C.ConfigError, match=r"train\.batch_size: expected int, got 1.5"):
        C.load(CONFIGS / "tiny.yaml", ["train.batch_size=1.5"])


@pytest.mark.parametrize("data,message", [
    ({"model": {"hidden_size": 100, "num_attention_heads": 3}}, "divisible by model.num_attention_heads"),
    ({"model": {"num_attention_heads": 4, "num_key_value_heads": 3}}, "divisible by model.num_key_value_heads"),
    ({"train": {"seq_len": 512}, "model": {"max_position_embeddings": 256}}, "above model.max_position_embeddings"),
    ({"train": {"steps": 100}, "optim": {"warmup_steps": 10, "stage_switch": 101}}, r"stage_switch \(101\) must lie in"),
    ({"train": {"steps": 100}, "optim": {"warmup_steps": 10, "stage_switch": 10}}, r"stage_switch \(10\) must lie in"),
    ({"train": {"batch_size": 10, "grad_accum": 3}}, "divisible by train.grad_accum"),
])
def test_impossible_shapes_refused(data, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_dict(data)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(C.ConfigError, match="expected section.key=value"):
        C.apply_overrides({}, ["train.steps"])
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")


def test_dump_round_trips():
    cfg = C.load(CONFIGS / "bitnet_95m.yaml")
    import yaml
    again = C.from_dict(yaml.safe_load(C.dump(cfg)))
    assert again == cfg and C.diff_keys(cfg, again) == []


@pytest.mark.parametrize("override,key", [
    ("optim.grad_clip=.nan", "optim.grad_clip"),  # YAML .nan: a float NaN
    ("optim.eps=nan", "optim.eps"),  # a string, converted by float()
    ("model.rope_theta=.inf", "model.rope_theta"),
    ("optim.peak_lr_1=-.inf", "optim.peak_lr_1"),
    ("log.spike_zscore=1e999", "log.spike_zscore"),  # overflows to inf
    ("log.peak_flops=inf", "log.peak_flops"),  # float | null: the finite rule, not "expected float | null"
    ("model.initializer_range=" + "9" * 400, "model.initializer_range"),  # an int too large for a float
])
def test_non_finite_floats_refused(override, key):
    with pytest.raises(C.ConfigError, match=rf"^{key}: expected a finite number, got .*; give a real number"):
        C.load(CONFIGS / "tiny.yaml", [override])


def test_non_finite_floats_refused_from_yaml_and_in_code(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("optim:\n  weight_decay: .nan\n")
    with pytest.raises(C.ConfigError, match=r"optim\.weight_decay: expected a finite number.*e\.g\. the default 0\.1"):
        C.load(path)
    cfg = C.Config()  # built in code: validate() still refuses it
    cfg.log.entropy_floor = float("nan")
    with pytest.raises(C.ConfigError, match=r"log\.entropy_floor: expected a finite number.*give a real number"):
        C.validate(cfg)


@pytest.mark.parametrize("data,message", [
    ({"optim": {"grad_clip": 0}}, r"optim\.grad_clip must be positive, got 0.0; .*e\.g\. 1\.0"),
    ({"optim": {"grad_clip": -1.0}}, r"optim\.grad_clip must be positive, got -1.0; .*flips the gradient"),
    ({"optim": {"eps": 0}}, r"optim\.eps must be positive, got 0.0; .*e\.g\. 1e-8"),
    ({"optim": {"eps": -1e-8}}, r"optim\.eps must be positive"),
    ({"optim": {"weight_decay": -0.1}}, r"optim\.weight_decay must be >= 0 \(0: no decay\), got -0.1; .*e\.g\. use 0\.1"),
    ({"model": {"rope_theta": 0}}, r"model\.rope_theta must be positive, got 0.0; .*e\.g\. 10000\.0"),
    ({"model": {"rope_theta": -10000.0}}, r"model\.rope_theta must be positive"),
    ({"model": {"rms_norm_eps": 0}}, r"model\.rms_norm_eps must be positive, got 0.0; .*e\.g\. 1e-5"),
    ({"model": {"rms_norm_eps": -1e-5}}, r"model\.rms_norm_eps must be positive"),
    ({"model": {"initializer_range": -0.02}}, r"model\.initializer_range must be positive, got -0.02; .*e\.g\. 0\.02"),
    ({"model": {"initializer_range": 0}}, r"model\.initializer_range must be positive.*nothing learns"),
    ({"train": {"seed": -1}}, r"train\.seed must lie in \[0, 2147483647\], got -1; pick a smaller non-negative seed"),
    ({"train": {"seed": 2**63}}, r"train\.seed must lie in \[0, 2147483647\]"),
    ({"name": ""}, r"name '' starts the run folder's name: give a non-empty name"),
    ({"name": "runs/tiny"}, r"name 'runs/tiny' .*without '/'"),
    ({"data": {"split": ""}}, r"data\.split is empty; give a name \(default: 'train'\)"),
    ({"data": {"text_column": " "}}, r"data\.text_column is empty; give a name \(default: 'text'\)"),
    ({"data": {"source": "local", "data_files": ["a.txt", ""]}}, r"data\.data_files holds an empty path; give a file"),
    ({"data": {"source": "builtin", "data_files": ["my.txt"]}}, r"ignores data\.data_files; set data\.source=local"),
    ({"data": {"hf_path": "someone/corpus"}}, r"'builtin' .*ignores data\.hf_path"),
])
def test_impossible_values_refused(data, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_dict(data)


def test_eval_batches_must_be_positive_while_evaluation_is_on():
    # eval.every > 0: evaluation runs (periodically and at the end), so it needs batches to average.
    with pytest.raises(C.ConfigError, match=r"eval\.batches is 0 but evaluation is on \(eval\.every=100\).*"
                                            r"set eval\.batches >= 1, or eval\.every=0 to turn evaluation off"):
        C.load(CONFIGS / "tiny.yaml", ["eval.every=100", "eval.batches=0"])
    with pytest.raises(C.ConfigError, match=r"eval\.batches must be >= 1 \(or 0 with eval\.every=0.*got -1"):
        C.from_dict({"eval": {"every": 0, "batches": -1}})  # negative: refused even with evaluation off
    with pytest.raises(C.ConfigError, match=r"data\.eval_documents is 0 .*evaluation is on.*"
                                            r"set data\.eval_documents to null .*or eval\.every=0"):
        C.from_dict({"data": {"eval_documents": 0}})
    # eval.every = 0 turns evaluation off: then nothing needs to be held out.
    off = C.from_dict({"eval": {"every": 0, "batches": 0}, "data": {"eval_documents": 0}})
    assert (off.eval.every, off.eval.batches, off.data.eval_documents) == (0, 0, 0)


def test_cudnn_attention_needs_bfloat16():
    with pytest.raises(C.ConfigError, match=r"model\.attention 'cudnn' needs model\.compute_dtype bfloat16.*"
                                            r"set model\.compute_dtype=bfloat16, or model\.attention=auto or xla"):
        C.from_dict({"model": {"attention": "cudnn", "compute_dtype": "float32"}})
    assert C.from_dict({"model": {"attention": "cudnn", "compute_dtype": "bfloat16"}}).model.attention == "cudnn"
    for attention in ("auto", "xla"):
        assert C.from_dict({"model": {"attention": attention, "compute_dtype": "float32"}}).model.attention == attention


@pytest.mark.parametrize("value", [0, [], "big", False])
def test_section_that_is_not_a_mapping_refused(value):
    """A falsy non-mapping used to be replaced by the defaults silently."""
    with pytest.raises(C.ConfigError, match=r"^model: expected a section .*got .*; give model's keys under it, "
                                            r"or leave it out for the defaults"):
        C.from_dict({"model": value})


def test_empty_section_means_defaults(tmp_path):
    path = tmp_path / "empty_section.yaml"
    path.write_text("model:\ntrain:\n  steps: 80\n")  # "model:" with nothing under it is null
    cfg = C.load(path)
    assert cfg.model == C.ModelConfig() and cfg.train.steps == 80
    assert C.load(path, ["model.hidden_size=64"]).model.hidden_size == 64  # --set into the empty section
    with pytest.raises(C.ConfigError, match=r"the config: expected a mapping of keys \(name, model, train, \.\.\.\)"):
        C.from_dict([])


@pytest.mark.parametrize("text,kind", [("- model\n- train\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(C.ConfigError, match=rf"bad\.yaml: the top level must be a mapping of sections .*got a {kind}.*"
                                            r"see configs/tiny\.yaml"):
        C.load(path)
    path.write_text("")  # an empty file is all defaults, named after the file
    assert C.load(path).name == "bad"


def test_unknown_non_string_key_named():
    with pytest.raises(C.ConfigError, match=r"unknown config key train\.1 \(in train\)"):
        C.from_dict({"train": {1: 2, "stpes": 3}})


# --------------------------------------------------------------------------- --set train.steps alone

def test_set_train_steps_alone_shrinks_the_95m_schedule_at_the_same_shares():
    full = C.load(CONFIGS / "bitnet_95m.yaml")
    cfg, notes = C.load_with_notes(CONFIGS / "bitnet_95m.yaml", ["train.steps=3"])
    # 375 / 60000 of 3 steps rounds to 0, but a warm-up stays >= 1; 30000 / 60000 of 3 is 1.5 -> 2
    assert (cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.stage_switch, cfg.stage_switch) == (3, 1, 2, 2)
    assert notes == ["train.steps=3: optim.warmup_steps 375 -> 1, optim.stage_switch 30000 -> 2 (same share of the run)"]
    assert C.diff_keys(full, cfg) == ["train.steps", "optim.warmup_steps", "optim.stage_switch"]
    assert C.load(CONFIGS / "bitnet_95m.yaml", ["train.steps=3"]) == cfg  # load is load_with_notes' config


@pytest.mark.parametrize("steps", [1, 2, 5, 17, 1000, 59999, 120000])
def test_derived_schedule_is_valid_and_keeps_its_share(steps):
    full = C.load(CONFIGS / "bitnet_95m.yaml")
    cfg = C.load(CONFIGS / "bitnet_95m.yaml", [f"train.steps={steps}"])
    w, s = cfg.optim.warmup_steps, cfg.optim.stage_switch
    assert w < s <= steps and (w >= 1 or steps == 1)
    share = steps / full.train.steps
    # off by the rounding only, unless a warm-up below half a step became 1, or the switch had to follow it
    assert abs(w - full.optim.warmup_steps * share) <= 0.5 or (w == 1 and full.optim.warmup_steps * share < 0.5)
    assert abs(s - full.optim.stage_switch * share) <= 0.5 or s == w + 1


def test_keys_set_with_train_steps_are_kept_and_a_null_switch_stays_half():
    cfg, notes = C.load_with_notes(CONFIGS / "bitnet_95m.yaml", ["train.steps=1000", "optim.warmup_steps=10"])
    assert (cfg.optim.warmup_steps, cfg.optim.stage_switch) == (10, 500)
    assert notes == ["train.steps=1000: optim.stage_switch 30000 -> 500 (same share of the run)"]
    tiny, notes = C.load_with_notes(CONFIGS / "tiny.yaml", ["train.steps=100"])  # stage_switch: null (half)
    assert (tiny.optim.warmup_steps, tiny.optim.stage_switch, tiny.stage_switch) == (3, None, 50)
    assert notes == ["train.steps=100: optim.warmup_steps 30 -> 3 (same share of the run)"]
    assert C.load_with_notes(CONFIGS / "tiny.yaml", ["eval.every=10"])[1] == []  # train.steps not set: nothing derived


def test_derived_values_are_stored_resolved_and_never_derived_again():
    """config.yaml and a checkpoint store the derived values; a resume applies --set to them as stored."""
    import yaml
    cfg = C.load(CONFIGS / "bitnet_95m.yaml", ["train.steps=3"])
    stored = C.from_dict(yaml.safe_load(C.dump(cfg)))
    assert stored == cfg and (stored.optim.warmup_steps, stored.optim.stage_switch) == (1, 2)
    # the same --config and --set again (e.g. a resume through make) resolve to the very same config
    assert C.diff_keys(stored, C.load(CONFIGS / "bitnet_95m.yaml", ["train.steps=3"])) == []
    # a new run branched from a checkpoint keeps the schedule it has half run
    longer = C.with_overrides(stored.to_dict(), ["train.steps=6"])
    assert (longer.train.steps, longer.optim.warmup_steps, longer.optim.stage_switch) == (6, 1, 2)


@pytest.mark.parametrize("base,overrides,message", [
    ("file", ["optim.warmup_steps=40000"], r"^optim\.warmup_steps \(40000\) must end before the stage switch: "
                                            r".* got 40000 < 30000 <= 60000; lower optim\.warmup_steps"),
    ("stored", ["train.steps=20000"], r"^train\.steps \(20000\) is too short for the schedule: .*"
                                      r"got 375 < 30000 <= 20000; raise train\.steps"),
    ("stored", ["optim.warmup_steps=30000"], r"^optim\.warmup_steps \(30000\) must end before"),
    ("stored", ["optim.stage_switch=70000"], r"^optim\.stage_switch \(70000\) must lie in \(optim\.warmup_steps, "
                                             r"train\.steps\] = \(375, 60000\]"),
    ("stored", ["train.steps=1000", "optim.stage_switch=2000"], r"^optim\.stage_switch \(2000\) must lie in"),
    # the warm-up (375) outlasts 100 steps: no switch could fit, so train.steps is at fault, not the switch
    ("stored", ["train.steps=100", "optim.stage_switch=200"], r"^train\.steps \(100\) is too short"),
])
def test_schedule_error_names_the_key_that_was_set(base, overrides, message):
    """warmup < switch <= steps broken by --set: the message names the key the user changed."""
    with pytest.raises(C.ConfigError, match=message):
        if base == "file":
            C.load(CONFIGS / "bitnet_95m.yaml", overrides)
        else:  # a resume applies --set to the checkpoint's stored config
            C.with_overrides(C.load(CONFIGS / "bitnet_95m.yaml").to_dict(), overrides)


def test_schedule_error_with_an_implicit_switch_names_warmup_or_steps():
    with pytest.raises(C.ConfigError, match=r"^optim\.warmup_steps \(60\) must end before the stage switch: .*"
                                            r"got 60 < 50 \(half of train\.steps\) <= 100"):
        C.from_dict({"train": {"steps": 100}, "optim": {"warmup_steps": 60}})
    with pytest.raises(C.ConfigError, match=r"^train\.steps \(50\) is too short .*got 30 < 25 \(half"):
        C.with_overrides(C.load(CONFIGS / "tiny.yaml").to_dict(), ["train.steps=50"])
    assert C.from_dict({"train": {"steps": 1}, "optim": {"warmup_steps": 0}}).stage_switch == 1  # one step: stage 1


# --------------------------------------------------------------------------- the objects and lenient reading

def test_config_objects_pickle_compare_and_stay_unhashable():
    import pickle
    cfg = C.load(CONFIGS / "bitnet_95m.yaml")
    assert pickle.loads(pickle.dumps(cfg)) == cfg and pickle.loads(pickle.dumps(cfg.model)) == cfg.model
    with pytest.raises(TypeError):
        hash(cfg)  # mutable, as the dataclasses were: never a jit static argument
    mesh = C.MeshConfig(data=2, fsdp=1)
    assert (mesh.data, mesh.fsdp) == (2, 1) and mesh != C.MeshConfig()
    with pytest.raises(ValueError):
        cfg.train.stpes = 3  # a typo in code is refused, as slots did


def test_lenient_reading_of_a_config_yaml_from_another_version():
    import yaml
    data = yaml.safe_load(C.dump(C.load(CONFIGS / "bitnet_95m.yaml")))
    data["model"]["sparsity"] = 0.5  # a key of a newer version
    data["log"]["prompts"] = ["fine", 7]  # a value this version cannot read
    data["eval"] = "often"  # a section that is no mapping
    del data["checkpoint"]  # an older version without the section
    lenient = C.load_lenient(data)
    assert [lenient.get(k) for k in ("train.steps", "tokens_per_step", "stage_switch", "total_tokens")] == [
        60000, 32768, 30000, 1_966_080_000]
    assert lenient.get("model.hidden_size") == 768 and lenient.get("log.samples_every") == 1000
    assert lenient.get("log.prompts") is None and lenient.get("eval.every") is None  # unread: not the defaults
    assert lenient.unread == {"log.prompts", "eval.every", "eval.batches"}
    assert lenient.config.checkpoint == C.CheckpointConfig() == lenient.get("checkpoint")  # missing: the defaults
    assert lenient.notes == [
        "model.sparsity is not a key of this version; ignored",
        "eval: expected a section (a mapping of keys such as every, batches), got 'often'; give eval's keys "
        "under it, or leave it out for the defaults; read as the default",
        "log.prompts[1]: expected str, got 7 (int); read as the default"]
    assert C.load_lenient(["not", "a", "mapping"]) is None


def test_lenient_reading_keeps_values_that_break_a_rule_and_an_unreadable_total_is_untrusted():
    data = {"train": {"steps": "sixty thousand", "batch_size": 8}, "optim": {"warmup_steps": 500, "stage_switch": 400}}
    lenient = C.load_lenient(data)
    assert (lenient.get("optim.stage_switch"), lenient.get("stage_switch"), lenient.get("tokens_per_step")) == (
        400, 400, 8 * 128)  # an explicit switch does not need train.steps
    assert lenient.get("train.steps") is None and lenient.get("total_tokens") is None
    data["optim"]["stage_switch"] = None  # half of train.steps, which is unknown
    assert C.load_lenient(data).get("stage_switch") is None and C.load_lenient(data).get("optim.stage_switch") is None
    assert lenient.notes == ["train.steps: expected int, got 'sixty thousand' (str); read as the default",
                             "optim.warmup_steps (500) must end before the stage switch: optim.warmup_steps < stage "
                             "switch <= train.steps must hold, got 500 < 400 <= 300; lower optim.warmup_steps; "
                             "read as written"]


def test_lenient_reading_imports_no_jax():
    import subprocess
    import sys
    code = ("import sys; from bitnet_jax import config; config.load_lenient({'train': {'steps': 'x'}}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=CONFIGS.parent)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_a_warmup_at_or_past_train_steps_is_blamed_not_the_stage_switch():
    # no stage switch fits in (warmup, steps] = (30, 20]: the switch is not what is wrong
    with pytest.raises(C.ConfigError, match=r"^optim\.warmup_steps \(30\) must end before the stage switch.*"
                                            r"lower optim\.warmup_steps$"):
        C.from_dict({"train": {"steps": 20}, "optim": {"stage_switch": 10}})
    with pytest.raises(C.ConfigError, match=r"^optim\.warmup_steps \(375\) must end"):
        C.load(CONFIGS / "bitnet_95m.yaml", ["train.steps=100", "optim.stage_switch=50", "optim.warmup_steps=375"])
    # only train.steps set this time (a resume shortening the run): train.steps is named
    stored = C.from_dict({"train": {"steps": 100}, "optim": {"warmup_steps": 30, "stage_switch": 50}})
    with pytest.raises(C.ConfigError, match=r"^train\.steps \(20\) is too short for the schedule"):
        C.with_overrides(stored.to_dict(), ["train.steps=20"])
