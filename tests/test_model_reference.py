"""Our logits equal transformers' PyTorch BitNetForCausalLM (online autobitlinear quantization)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from bitnet_jax.config import ModelConfig
from bitnet_jax.hf import torch_reference_model
from bitnet_jax.model import BitNetLM, count_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_model(cfg: ModelConfig, params):
    return torch_reference_model(cfg, params).eval()


@pytest.mark.parametrize("act,kv_heads", [("relu2", 2), ("silu", 2), ("relu2", None)])
def test_logits_match_transformers_bitnet(act, kv_heads):
    cfg = ModelConfig(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=64,
                      hidden_act=act, initializer_range=0.05)
    model = BitNetLM(cfg, rngs=nnx.Rngs(3))
    # Non-trivial norm weights, so a swapped or missing norm shows.
    _, params = nnx.split(model, nnx.Param)
    key = jax.random.PRNGKey(7)
    for path, var in nnx.to_flat_state(params):
        if var[...].ndim == 1:
            key, sub = jax.random.split(key)
            var[...] = 1.0 + 0.3 * jax.random.normal(sub, var[...].shape)
    nnx.update(model, params)

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))

    hf = _hf_model(cfg, params)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()

    assert count_params(cfg) == sum(p.numel() for p in hf.parameters())
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-4 * scale, (np.abs(ours - theirs).max(), scale)


def test_hf_model_really_quantizes():
    """Guard against the reference silently running float linears: quantized and float differ."""
    from transformers.integrations.bitnet import AutoBitLinear

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=16)
    model = BitNetLM(cfg, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    hf = _hf_model(cfg, params)
    assert isinstance(hf.model.layers[0].self_attn.q_proj, AutoBitLinear)
    assert hf.model.layers[0].self_attn.q_proj.online_quant
    assert not isinstance(hf.lm_head, AutoBitLinear)  # the tied head stays full precision
