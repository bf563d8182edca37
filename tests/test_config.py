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
