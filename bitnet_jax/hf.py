"""Mapping between our parameters and transformers' ``BitNetForCausalLM`` (config and state dict).

Used by the numerical reference test and by export. Names map one to one; linear weights are
transposed (ours ``[in, out]``, HF's ``[out, in]``); the LM head is tied to ``embed_tokens``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from bitnet_jax.config import ModelConfig

ONLINE_QUANTIZATION = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def hf_config_dict(cfg: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   quantization_mode: str = "online") -> dict[str, Any]:
    """``BitNetConfig`` fields for this model, with the BitNet quantization_config that makes
    transformers run quantized (AutoBitLinear) instead of plain float linears."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "quantization_config": {**ONLINE_QUANTIZATION, "quantization_mode": quantization_mode},
    }


def hf_name(path: tuple) -> str:
    """``('layers', 0, 'self_attn', 'q_proj', 'weight')`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight"
    return "model." + ".".join(str(p) for p in path)


def hf_state_dict(params: nnx.State) -> dict[str, np.ndarray]:
    """float32 numpy arrays keyed by HF names (``lm_head.weight`` omitted: it is tied)."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        value = np.asarray(var[...], dtype=np.float32)
        if len(path) > 1 and value.ndim == 2:  # BitLinear: [in, out] -> [out, in]
            value = np.ascontiguousarray(value.T)
        out[hf_name(tuple(path))] = value
    return out
