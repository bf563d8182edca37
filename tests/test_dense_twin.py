"""The dense twin (``model.quantization: none``): BitNet's architecture, names and tied head with plain
float linears. Its logits equal transformers' BitNet model run without quantization, it trains, and
no BitNet export takes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax import sharding, train_state
from bitnet_jax.config import Config, ModelConfig, TokenizerConfig, from_dict
from bitnet_jax.model import BitNetLM

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

MODEL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64, initializer_range=0.05, quantization="none")


def _model_with_norms(cfg: ModelConfig, seed: int = 3) -> tuple[BitNetLM, nnx.State]:
    """Norm weights around 1 rather than exactly 1, so a swapped or missing norm shows in the logits."""
    model = BitNetLM(cfg, rngs=nnx.Rngs(seed))
    _, params = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    params = jax.tree.unflatten(treedef, [p if p.ndim > 1 else 1.0 + 0.3 * jax.random.normal(k, p.shape)
                                          for p, k in zip(leaves, keys)])
    nnx.update(model, params)
    return model, params


@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_dense_twin_logits_equal_transformers_bitnet_without_quantization(act):
    """transformers runs a BitNet config without quantization_config on plain nn.Linear layers: the
    same float function as ours, so only float32 summation order separates the two (no quantizer
    turns that into a rounding flip here)."""
    from bitnet_jax.hf import torch_reference_model
    from transformers.integrations.bitnet import AutoBitLinear

    cfg = ModelConfig(**{**MODEL, "hidden_act": act})
    model, params = _model_with_norms(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))
    hf = torch_reference_model(cfg, params).eval()
    assert isinstance(hf.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not any(isinstance(m, AutoBitLinear) for m in hf.modules())
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-5 * scale

    # Same parameters, BitNet quantization on: a different model (so the twin really is unquantized).
    bitnet = BitNetLM(cfg.model_copy(update={"quantization": "bitnet"}), rngs=nnx.Rngs(0))
    nnx.update(bitnet, params)
    assert np.abs(np.asarray(bitnet(jnp.asarray(tokens))) - ours).max() > 0.01 * scale


def test_dense_twin_has_bitnets_parameters_and_trains():
    data = {"model": MODEL, "train": {"steps": 20, "batch_size": 4, "seq_len": 16},
            "optim": {"warmup_steps": 2, "peak_lr_1": 1e-2, "peak_lr_2": 5e-3}}
    cfg = from_dict(data)
    bitnet_cfg = from_dict({**data, "model": {**MODEL, "quantization": "bitnet"}})
    shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), train_state.abstract_state(c)[1].params)
    assert shapes(cfg) == shapes(bitnet_cfg)  # same names, shapes and tied head: checkpoints interchange

    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, state = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state, mesh)
    step = train_state.make_train_step(cfg, graphdef, mesh, shardings)
    batch = sharding.global_batch(np.random.default_rng(1).integers(0, 300, (4, 17)).astype(np.int32), mesh)
    losses = []
    for _ in range(12):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isclose(losses[0], np.log(300), rtol=0.05)  # small random init: near-uniform predictions
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("fmt", ["online", "packed"])
def test_no_bitnet_export_of_the_dense_twin(fmt, tmp_path):
    from bitnet_jax.data import load_tokenizer
    from bitnet_jax.export import ExportError, export_model

    cfg = Config(model=ModelConfig(**MODEL), tokenizer=TokenizerConfig(builtin_vocab_size=300))
    tok_dir = load_tokenizer(cfg.tokenizer).save(tmp_path / "tokenizer")
    _, params = _model_with_norms(cfg.model)
    with pytest.raises(ExportError, match=r"dense twin \(model.quantization: none\).*would quantize"):
        export_model(cfg, params, tok_dir, tmp_path / "hf", fmt)
    assert not (tmp_path / "hf").exists()
