"""Device-memory estimate of one training step, for the dry run: the train state plus what the
forward pass keeps for the backward pass, counted from this model's own tensors.

What is kept depends on the config: ``model.attention`` (XLA's attention keeps its float32 softmax
numerators and their compute-dtype copy, ``[heads, T, T]`` per sequence; cuDNN's fused attention
keeps only one float32 log-sum-exp per head and token), ``model.compute_dtype`` (bytes per kept
value), ``model.quantization`` and ``model.matmul`` (which copies of the projection weights live
through the step). It is an estimate: XLA may fuse away or rematerialise some of these, and its
scratch buffers are not counted. ``benchmarks/gpu_bench.sh`` prints it beside the measured peak.
"""

from __future__ import annotations

from bitnet_jax.config import Config
from bitnet_jax.model import attention_implementation, count_params, product_kind

GIB = 2**30


def kept_values_per_token(cfg: Config) -> int:
    """Compute-dtype values one decoder layer keeps per token for the backward pass, besides the
    attention's own (``attention_bytes_per_token``)."""
    m = cfg.model
    d, f = m.hidden_size, m.intermediate_size
    q, kv = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    return (d  # the layer input, for input_layernorm's backward
            + d  # its normalised (quantized) copy, the input of q/k/v
            + q + 2 * kv  # q, k, v after RoPE
            + q  # attn_sub_norm's input
            + q  # o_proj's input
            + d  # the residual stream after attention, for post_attention_layernorm
            + d  # its normalised copy, the input of gate/up
            + 4 * f  # gate, up, act(gate) and their product (ffn_sub_norm's input)
            + f)  # down_proj's input


def attention_bytes_per_token(cfg: Config, backend: str | None = None) -> float:
    """Bytes the attention keeps per token and layer: with XLA, a row of ``T`` float32 numerators per
    head (and their copy in a 16-bit compute dtype, the value matmul's operand), plus the float32
    output before its normalisation; with cuDNN, one float32 log-sum-exp per head (flash attention
    recomputes the matrices in the backward)."""
    m, t = cfg.model, cfg.train
    heads, e = m.num_attention_heads, _bytes(m.compute_dtype)
    if attention_implementation(m.attention, m.compute_dtype, backend) == "cudnn":
        return 4.0 * heads
    per_score = 4.0 + _copy(e)
    return heads * t.seq_len * per_score + 4.0 * heads * m.head_dim


def estimate_bytes(cfg: Config, backend: str | None = None) -> dict[str, float]:
    """Bytes of device memory for training ``cfg`` on ``backend`` (default: JAX's; it decides what
    ``model.attention: auto`` runs as). Keys: ``state`` (float32 params, gradients and two Adam
    moments, 16 B per parameter, plus a float32 gradient accumulator with ``train.grad_accum`` > 1),
    ``weights`` (the projections' quantized compute-dtype copies, which the backward multiplies by,
    and their int8 codes with ``matmul: int8``; the embedding's compute-dtype copy),
    ``activations`` (all layers, one micro-batch), ``attention`` (the part of ``activations`` that
    the attention keeps), ``logits`` (float32 logits, their gradient and its compute-dtype copy), and
    ``total``."""
    m, t = cfg.model, cfg.train
    n, e = count_params(m), _bytes(m.compute_dtype)
    tokens = t.batch_size // t.grad_accum * t.seq_len
    state = (16.0 + (4.0 if t.grad_accum > 1 else 0.0)) * n
    linear_params = n - m.vocab_size * m.hidden_size - _norm_params(cfg)
    weights = _weight_copy_bytes(product_kind(m), e) * linear_params + _copy(e) * m.vocab_size * m.hidden_size
    attention = tokens * m.num_hidden_layers * attention_bytes_per_token(cfg, backend)
    activations = tokens * m.num_hidden_layers * kept_values_per_token(cfg) * e + attention
    logits = tokens * m.vocab_size * (4.0 + 4.0 + _copy(e))
    total = state + weights + activations + logits
    return {"state": state, "weights": weights, "activations": activations, "attention": attention,
            "logits": logits, "total": total}


def _weight_copy_bytes(product: str, e: int) -> int:
    """Bytes per projection weight held besides the float32 master: the quantized copy in the compute
    dtype that the backward multiplies by, plus (int8) the int8 codes of the forward product. A dense
    linear in float32 multiplies the master weights themselves."""
    if product == "dense":
        return _copy(e)
    return e + (1 if product == "int8" else 0)


def _copy(e: int) -> int:
    """Bytes of a compute-dtype copy of a float32 value: none when the compute dtype is float32."""
    return 0 if e == 4 else e


def _bytes(compute_dtype: str) -> int:
    return 2 if compute_dtype == "bfloat16" else 4


def _norm_params(cfg: Config) -> int:
    m = cfg.model
    return m.num_hidden_layers * (3 * m.hidden_size + m.intermediate_size) + m.hidden_size
