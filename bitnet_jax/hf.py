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
                   quantization_mode: str = "online", dtype: str = "float32") -> dict[str, Any]:
    """``BitNetConfig`` fields for this model, with the BitNet quantization_config that makes
    transformers run quantized (AutoBitLinear) instead of plain float linears. ``dtype`` is the dtype
    of the stored full-precision tensors (float32 master weights, or bfloat16 in the packed format)."""
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
        "torch_dtype": dtype,  # the key transformers 4.x reads; 5.x accepts it as well
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
        if is_bitlinear(path, value):  # [in, out] -> [out, in]
            value = np.ascontiguousarray(value.T)
        out[hf_name(tuple(path))] = value
    return out


# --------------------------------------------------------------------------- packed (offline) format

VALUES_PER_BYTE = 4  # ternary values per uint8: 2 bits each


def is_bitlinear(path: tuple, value) -> bool:
    """Projection weights (quantized): every 2-D parameter below the top level (not the embedding)."""
    return len(path) > 1 and np.ndim(value) == 2


def pack_ternary(t_OxI: np.ndarray) -> np.ndarray:
    """Packs ternary values ``[out, in]`` in {-1, 0, 1} into uint8 ``[out / 4, in]``.

    The layout is transformers' ``pack_weights`` (integrations/bitnet.py): the rows are cut into four
    quarter-row blocks, and byte ``[j, c]`` holds ``t[j + k * out/4, c] + 1`` in bits ``2k..2k+1``
    for k = 0..3. ``out`` must be divisible by 4 (transformers only unpacks that case).
    """
    out = t_OxI.shape[0]
    if out % VALUES_PER_BYTE:
        raise ValueError(f"cannot pack {out} rows: the packed format needs a multiple of {VALUES_PER_BYTE}")
    codes = (np.asarray(t_OxI) + 1).astype(np.uint8).reshape(VALUES_PER_BYTE, out // VALUES_PER_BYTE,
                                                              *t_OxI.shape[1:])
    packed = np.zeros(codes.shape[1:], np.uint8)
    for k in range(VALUES_PER_BYTE):
        packed |= codes[k] << (2 * k)
    return packed


def hf_packed_state_dict(params: nnx.State) -> dict[str, np.ndarray]:
    """The offline-quantized state dict: for every projection, ``weight`` = packed ternary uint8
    ``[out / 4, in]`` and ``weight_scale`` = gamma as bfloat16 ``[1]``; the embedding and norm weights
    in bfloat16 (``lm_head.weight`` omitted: it is tied).

    The ternary values come from ``quant.ternary`` on the float32 master weights, exactly as the
    model computes them; only gamma and the full-precision tensors are rounded to bfloat16.
    """
    import jax.numpy as jnp
    import ml_dtypes

    from bitnet_jax.quant import ternary

    out = {}
    for path, var in nnx.to_flat_state(params):
        path = tuple(path)
        value = np.asarray(var[...], dtype=np.float32)
        name = hf_name(path)
        if is_bitlinear(path, value):
            t, gamma = ternary(jnp.asarray(value))
            out[name] = pack_ternary(np.asarray(t, np.int8).T)  # [in, out] -> [out, in], then pack rows
            out[name + "_scale"] = np.asarray([float(gamma)], dtype=ml_dtypes.bfloat16)
        else:
            out[name] = value.astype(ml_dtypes.bfloat16)
    return out


def packing_problems(cfg: ModelConfig) -> list[str]:
    """Projection output sizes that the packed format cannot hold (each must be divisible by 4)."""
    outs = {"q_proj": cfg.num_attention_heads * cfg.head_dim, "k_proj / v_proj": cfg.kv_heads * cfg.head_dim,
            "o_proj / down_proj": cfg.hidden_size, "gate_proj / up_proj": cfg.intermediate_size}
    return [f"{name} has {n} outputs" for name, n in outs.items() if n % VALUES_PER_BYTE]


def torch_reference_model(cfg: ModelConfig, params: nnx.State):
    """transformers' PyTorch ``BitNetForCausalLM`` holding our weights, with online ``autobitlinear``
    quantization (float32); for the dense twin (``quantization: none``) without quantization, as
    transformers runs a BitNet config that has no quantization_config. The numerical reference for
    tests and the baseline for benchmarks.

    transformers swaps ``nn.Linear`` for ``AutoBitLinear`` only when it loads a checkpoint through its
    quantization machinery; building the model directly, the same replacement is applied by hand (the
    tied LM head stays a plain float linear, as the loader leaves it). Needs torch and accelerate."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    fields = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    if cfg.quantization == "none":  # the dense twin: without a quantization_config, plain float linears
        del fields["quantization_config"]
    hf_cfg = BitNetConfig(**fields)
    model = BitNetForCausalLM(hf_cfg)
    if cfg.quantization == "bitnet":
        model = replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"],
                                           quantization_config=BitNetQuantConfig(**hf_cfg.quantization_config))
    state = {k: torch.from_numpy(v.copy()) for k, v in hf_state_dict(params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers' BitNet: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model
