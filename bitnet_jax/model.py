"""BitNet b1.58 decoder in Flax NNX, laid out like transformers' ``BitNetForCausalLM``.

Module and parameter names follow the Hugging Face model (``embed_tokens``, ``layers[i].self_attn.q_proj``,
``attn_sub_norm``, ``mlp.ffn_sub_norm``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``)
so that ``hf_state_dict`` maps a checkpoint to it one to one. One difference: our linear weights are
stored ``[in, out]`` (JAX's ``x @ W``); HF stores ``[out, in]``.

Shapes: B batch, T query length, S key length, D hidden, N query heads, K key/value heads,
H head dim, F intermediate, V vocab.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bitnet_jax.config import ModelConfig
from bitnet_jax.quant import activation_codes, quantize_activation_ste, quantize_weight_ste, ternary


def _dtype(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class KVCache(NamedTuple):
    """Per-layer key/value buffers for incremental decoding, ``[B, S_max, K, H]`` each."""

    keys: jax.Array
    values: jax.Array


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, in float32, cast back to the compute dtype."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    @jax.named_scope("rmsnorm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...]).astype(self.dtype)


def compute_dtype_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., I] @ w [I, O]`` with float32 accumulation, rounded to ``x``'s dtype; ``w`` has that
    dtype too. In float32 compute this is the plain expression and its autodiff, so float32 runs
    (CPU, the transformers-equal path) are bit for bit what they were. In a narrower compute dtype
    (bf16) autodiff's backward would multiply the float32-widened cotangent by the bf16 operands, a
    float32 x bf16 product that XLA runs as a float32 matmul on widened copies; ``_narrow_matmul``
    keeps the cotangent in the compute dtype instead, so both backward products multiply bf16
    operands with float32 accumulation. Widening bf16 to float32 is exact, so the gradients equal
    autodiff's up to summation order."""
    if jnp.dtype(x.dtype) == jnp.float32:
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    return _narrow_matmul(x, w)


@jax.custom_vjp
def _narrow_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _matmul_fwd(x, w):
    return _narrow_matmul(x, w), (x, w)


def _matmul_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    batch = tuple(range(x.ndim - 1))
    dx = jax.lax.dot_general(g, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(x, g, ((batch, batch), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_narrow_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def float_product(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The BitLinear product as transformers computes it (``model.matmul: float``): the quantized
    values ``q / s`` and ``t * gamma`` (float32, straight-through) cast to the compute dtype and
    multiplied with float32 accumulation. ``x [..., I] @ w [I, O] -> [..., O]`` in ``dtype``."""
    with jax.named_scope("act_quant"):
        xq = quantize_activation_ste(x).astype(dtype)
    with jax.named_scope("weight_quant"):
        wq = quantize_weight_ste(w).astype(dtype)
    with jax.named_scope("bitlinear_matmul"):
        return compute_dtype_matmul(xq, wq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def int8_product(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The BitLinear product on the integer codes (``model.matmul: int8``): int8 activations ``q``
    times int8 ternary weights ``t``, summed exactly in int32, then one rescale by ``gamma / s``.
    The same function as ``float_product`` without the rounding of its products and sums (so equal
    to it within float rounding, up to the rare later quantizer that this rounding tips over a code
    boundary); on GPUs it can run on int8 tensor cores. The backward pass is ``float_product``'s
    own (straight-through, in the compute dtype)."""
    with jax.named_scope("act_quant"):
        q, s = activation_codes(x)
        q_int8 = q.astype(jnp.int8)
    with jax.named_scope("weight_quant"):
        t, gamma = ternary(w)
        t_int8 = t.astype(jnp.int8)
    with jax.named_scope("bitlinear_matmul"):
        acc = jax.lax.dot_general(q_int8, t_int8, (((x.ndim - 1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        # int32 -> float32 is exact below 2^24 (|acc| <= 128 * in_features).
        return (acc.astype(jnp.float32) * (gamma / s)).astype(dtype)


def _int8_product_fwd(x, w, dtype):
    # The inputs are the residuals, as the float path keeps its quantized inputs: the same bytes.
    return int8_product(x, w, dtype), (x, w)


def _int8_product_bwd(dtype, residuals, g):
    # float_product's own backward: its forward product is unused here and removed by XLA.
    _, float_vjp = jax.vjp(lambda x, w: float_product(x, w, dtype), *residuals)
    return float_vjp(g)


int8_product.defvjp(_int8_product_fwd, _int8_product_bwd)


def dense_product(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A plain linear (``model.quantization: none``, the dense twin): ``x @ w`` in the compute dtype
    with float32 accumulation."""
    with jax.named_scope("bitlinear_matmul"):  # the same slot in profiles as the BitLinear products
        return compute_dtype_matmul(x.astype(dtype), w.astype(dtype))


PRODUCTS = {"float": float_product, "int8": int8_product, "dense": dense_product}


def product_kind(cfg: ModelConfig) -> str:
    """``dense`` for the dense twin, else the BitLinear product ``model.matmul`` names."""
    return "dense" if cfg.quantization == "none" else cfg.matmul


class BitLinear(nnx.Module):
    """Linear layer with ternary weights and int8 per-token activations (straight-through).

    ``y = quant_act(x) @ quant_weight(W)``; the quantizers run in float32, the product (``product``:
    see ``PRODUCTS``) in the compute dtype with float32 accumulation, or on the integer codes. The
    dense twin's layers are BitLinears with ``product="dense"``: same parameters, no quantization.
    No bias (BitNet has none).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype, init_std: float,
                 rngs: nnx.Rngs, product: str = "float"):
        init = jax.nn.initializers.normal(init_std)
        self.weight = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
        self.dtype = dtype
        self.product = product
        # Set by BitNet metrics (under nnx.capture) to record each token's input absmax; off in training.
        self.capture_input = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.capture_input:
            self.sow(nnx.Intermediate, "input_absmax", jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1))
        # Named scopes label the ops in profiles (benchmarks/bench_train.py --profile); no effect on numerics.
        return PRODUCTS[self.product](x, self.weight[...], self.dtype)


def _linear(cfg: ModelConfig, in_features: int, out_features: int, rngs: nnx.Rngs) -> BitLinear:
    return BitLinear(in_features, out_features, dtype=_dtype(cfg.compute_dtype), init_std=cfg.initializer_range,
                     rngs=rngs, product=product_kind(cfg))


@jax.custom_vjp
def tied_head(x_BxTxD: jax.Array, embed_VxD: jax.Array) -> jax.Array:
    """float32 logits ``x @ embed.T``. Same values and gradients as autodiff of that expression; only
    the embedding's gradient is computed as ``(x^T g)^T``: a plain matmul that reads the big
    ``[B*T, V]`` cotangent in place. Autodiff's ``g^T x`` makes XLA CPU either transpose ``g`` in memory
    (256 MB for 2048 tokens x 32000 ids) or run a 2-3x slower transposed-operand matmul."""
    return jnp.dot(x_BxTxD, embed_VxD.T, preferred_element_type=jnp.float32)


def _tied_head_fwd(x_BxTxD, embed_VxD):
    return tied_head(x_BxTxD, embed_VxD), (x_BxTxD, embed_VxD)


def _tied_head_bwd(res, g_BxTxV):
    x_BxTxD, embed_VxD = res
    # bf16 compute: the logits' cotangent is rounded to bf16 as well (as mixed-precision autocast does),
    # so both backward matmuls are bf16 x bf16 with float32 accumulation. A float32 x bf16 product
    # would make XLA upcast the embedding and run a float32 matmul over the [B*T, V] operand; these
    # two matmuls are 2/3 of the head's FLOPs. In float32 compute nothing is rounded.
    g_BxTxV = g_BxTxV.astype(x_BxTxD.dtype)
    dx_BxTxD = jnp.dot(g_BxTxV, embed_VxD, preferred_element_type=jnp.float32).astype(x_BxTxD.dtype)
    # As autodiff: accumulate in float32, round to the embedding's compute dtype.
    x_NxD, g_NxV = x_BxTxD.reshape(-1, x_BxTxD.shape[-1]), g_BxTxV.reshape(-1, g_BxTxV.shape[-1])
    dembed_DxV = jax.lax.dot_general(x_NxD, g_NxV, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    # The barrier keeps XLA from folding the small transpose below back into the matmul (g^T x again).
    dembed_DxV = jax.lax.optimization_barrier(dembed_DxV)
    return dx_BxTxD, dembed_DxV.T.astype(embed_VxD.dtype)


tied_head.defvjp(_tied_head_fwd, _tied_head_bwd)


def rope_tables(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[B, T, H]`` for the ``rotate_half`` convention (frequencies repeated over both halves)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@jax.named_scope("rope")
def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


@jax.named_scope("attention")
def _attention_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS) -> jax.Array:
    """Attention with a float32 softmax, normalised after the value matmul (``(e @ v) / sum(e)``, as
    flash attention does). Grouped-query heads share K/V without copies: the G query heads of a group
    are stacked along the rows of one ``[G*T, H] @ [H, S]`` matmul per (batch, kv head). This layout
    and the late normalisation make the CPU train step's attention about 2x faster than a 5-D einsum
    with ``jax.nn.softmax``; the values differ only by float rounding (~1e-6 relative)."""
    b, t, n, h = q_BxTxNxH.shape
    s, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    g = n // kv
    dtype = q_BxTxNxH.dtype
    q = (q_BxTxNxH.astype(jnp.float32) * (h ** -0.5)).astype(dtype)
    q_BxKxMxH = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)  # M = G*T
    k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxTxS[:, None, None], scores.reshape(b, kv, g, t, s), jnp.finfo(jnp.float32).min)
    # Softmax is shift-invariant, so the row max needs no gradient.
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    denom_BxKxGxTx1 = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkms,bksh->bkmh", weights.reshape(b, kv, g * t, s).astype(v_BxSxKxH.dtype), v_BxKxSxH,
                     preferred_element_type=jnp.float32)
    out = out.reshape(b, kv, g, t, h) / denom_BxKxGxTx1
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(dtype)


def attention_implementation(attention: str, compute_dtype, backend: str | None = None) -> str:
    """What ``model.attention`` runs as on ``backend`` (default: JAX's): ``cudnn`` (fused, stores no
    attention matrices) or ``xla`` (``_attention_xla``); ``auto`` is cuDNN on a GPU in bfloat16."""
    if attention != "auto":
        return attention
    backend = backend or jax.default_backend()
    return "cudnn" if jnp.dtype(compute_dtype) == jnp.bfloat16 and backend == "gpu" else "xla"


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtype(cfg.compute_dtype)
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = _linear(cfg, d, n * h, rngs)
        self.k_proj = _linear(cfg, d, k * h, rngs)
        self.v_proj = _linear(cfg, d, k * h, rngs)
        self.o_proj = _linear(cfg, n * h, d, rngs)
        self.attn_sub_norm = RMSNorm(d, cfg.rms_norm_eps, dt)
        self.num_heads, self.kv_heads, self.head_dim = n, k, h
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention
        self.dtype = dt

    def _use_cudnn(self) -> bool:
        return attention_implementation(self.implementation, self.dtype) == "cudnn"

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | None = None):
        b, t, _ = x_BxTxD.shape
        q = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_BxTxD).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x_BxTxD).reshape(b, t, self.kv_heads, self.head_dim)
        cos, sin = rope_tables(positions_BxT, self.head_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            if self._use_cudnn():
                with jax.named_scope("attention"):
                    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            else:
                causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
                out = _attention_xla(q, k, v, causal)
            new_cache = None
        else:
            # Write this chunk's keys at cache_index, attend to every filled position up to each query.
            keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), (0, cache_index, 0, 0))
            values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), (0, cache_index, 0, 0))
            key_pos = jnp.arange(keys.shape[1])
            mask = key_pos[None, None, :] <= positions_BxT[:, :, None]
            out = _attention_xla(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
            new_cache = KVCache(keys, values)

        out = self.attn_sub_norm(out.reshape(b, t, self.num_heads * self.head_dim))
        return self.o_proj(out), new_cache


class MLP(nnx.Module):
    """Gated MLP: ``down(ffn_sub_norm(act(gate(x)) * up(x)))`` with act relu2 (ReLU squared) or silu."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, rngs)
        self.up_proj = _linear(cfg, d, f, rngs)
        self.down_proj = _linear(cfg, f, d, rngs)
        self.ffn_sub_norm = RMSNorm(f, cfg.rms_norm_eps, _dtype(cfg.compute_dtype))
        self.hidden_act = cfg.hidden_act

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        gate = self.gate_proj(x_BxTxD)
        with jax.named_scope("mlp_act"):
            act = jnp.square(jax.nn.relu(gate)) if self.hidden_act == "relu2" else jax.nn.silu(gate)
        return self.down_proj(self.ffn_sub_norm(act * self.up_proj(x_BxTxD)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = _dtype(cfg.compute_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BxTxD, positions_BxT, cache=None, cache_index=None):
        attn, cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT, cache, cache_index)
        x_BxTxD = x_BxTxD + attn
        x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        return x_BxTxD, cache


class BitNetLM(nnx.Module):
    """Decoder-only BitNet b1.58 LM with a tied, full-precision embedding / LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = _dtype(cfg.compute_dtype)
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype)

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 caches: list[KVCache] | None = None, cache_index: jax.Array | None = None):
        """Returns float32 logits ``[B, T, V]``; with ``caches``, also the updated caches."""
        b, t = tokens_BxT.shape
        if positions_BxT is None:
            start = 0 if cache_index is None else cache_index
            positions_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        embed = self.embed_tokens[...]
        with jax.named_scope("embed"):
            x = jnp.take(embed, tokens_BxT, axis=0).astype(self.dtype)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions_BxT, None if caches is None else caches[i], cache_index)
            new_caches.append(c)
        x = self.norm(x)
        # The tied head stays full precision: logits in float32 whatever the compute dtype.
        with jax.named_scope("lm_head"):
            logits = tied_head(x, embed.astype(self.dtype))
        return logits if caches is None else (logits, new_caches)

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        cfg = self.config
        shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
        return [KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                for _ in range(cfg.num_hidden_layers)]


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count (tied embeddings counted once), without building the model."""
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    attn = d * cfg.num_attention_heads * h * 2 + d * cfg.kv_heads * h * 2 + d  # q,o + k,v + sub-norm
    mlp = 3 * d * f + f
    layer = attn + mlp + 2 * d
    return v * d + cfg.num_hidden_layers * layer + d


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, ``6 N + 12 L d T`` (PaLM appendix B / nanoGPT), N without embeddings
    counted once as matmul weights (the tied head is a matmul, the lookup is not)."""
    return 6 * count_params(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of a ``BitNetLM`` for ``cfg``, shapes only (nothing allocated)."""
    model = nnx.eval_shape(lambda: BitNetLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params
