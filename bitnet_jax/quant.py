"""BitNet b1.58 quantizers: ternary weights (per tensor) and int8 activations (per token).

Both are pure functions computed in float32, rounding half to even (``jnp.round``). The ``*_ste``
variants apply the straight-through estimator ``v + stop_gradient(q(v) - v)``: the forward value is
the quantized one and the gradient is the identity (no clipping mask), as in BitNet b1.58.
"""

import jax
import jax.numpy as jnp

WEIGHT_SCALE_FLOOR = 1e-5  # gamma = max(mean|W|, floor): an all-zero tensor stays zero, not NaN
ACT_ABSMAX_FLOOR = 1e-5  # an all-zero token stays zero
ACT_QMAX = 127.0


def weight_gamma(w: jax.Array) -> jax.Array:
    """Per-tensor scale ``max(mean(|W|), 1e-5)``, float32 scalar."""
    return jnp.maximum(jnp.mean(jnp.abs(w.astype(jnp.float32))), WEIGHT_SCALE_FLOOR)


def ternary(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (t, gamma): t in {-1, 0, 1} (float32, same shape as w) with ``W ~ t * gamma``."""
    gamma = weight_gamma(w)
    t = jnp.clip(jnp.round(w.astype(jnp.float32) / gamma), -1.0, 1.0)
    return t, gamma


def quantize_weight(w: jax.Array) -> jax.Array:
    """``clip(round(W / gamma), -1, 1) * gamma`` in float32."""
    t, gamma = ternary(w)
    return t * gamma


def activation_scale(x: jax.Array) -> jax.Array:
    """Per-token scale ``127 / max(max|x|, 1e-5)`` over the last axis, shape ``x.shape[:-1] + (1,)``."""
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return ACT_QMAX / jnp.maximum(absmax, ACT_ABSMAX_FLOOR)


def activation_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (q, s): the int8 codes ``clip(round(x * s), -128, 127)`` (float32 values, same shape as
    x) and the per-token scale ``s`` (``x.shape[:-1] + (1,)``), with ``x ~ q / s``."""
    s = activation_scale(x)
    return jnp.clip(jnp.round(x.astype(jnp.float32) * s), -128.0, 127.0), s


def quantize_activation(x: jax.Array) -> jax.Array:
    """``clip(round(x * s), -128, 127) / s`` per token, in float32."""
    q, s = activation_codes(x)
    return q / s


def _straight_through(v: jax.Array, q: jax.Array) -> jax.Array:
    v = v.astype(jnp.float32)
    return v + jax.lax.stop_gradient(q - v)


def quantize_weight_ste(w: jax.Array) -> jax.Array:
    return _straight_through(w, quantize_weight(w))


def quantize_activation_ste(x: jax.Array) -> jax.Array:
    return _straight_through(x, quantize_activation(x))
