"""BitNet health metrics per BitLinear: ternary fractions, gamma, flip rate, latent RMS, activation absmax.

All of it is one jitted function of (params, previous ternary pattern, one held-out batch), fetched
to the host in a single transfer. Tags (``bitnet/<module path>/<stat>`` and model-wide
``bitnet/model/<stat>``):

- ``frac_neg`` / ``frac_zero`` / ``frac_pos``: share of weights quantized to -1 / 0 / +1
- ``gamma``: the per-tensor scale ``max(mean|W|, 1e-5)``
- ``flip_rate``: share of weights whose ternary value changed since the previous measurement
  (omitted at the first measurement of a process: the previous pattern lives on the device only,
  since it is derivable, so a resumed run starts without it)
- ``latent_rms``: RMS of the float32 master weights
- ``act_absmax_mean`` / ``act_absmax_max``: per-token absmax of the layer's input (the value that
  sets the int8 activation scale) averaged / maximised over the held-out batch's tokens
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bitnet_jax.model import BitLinear
from bitnet_jax.quant import ternary

PREFIX = "bitnet"


def _bitlinears(model) -> dict[str, BitLinear]:
    """Every BitLinear of the model by dotted path, e.g. ``layers.0.self_attn.q_proj``."""
    return {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, BitLinear)}


def _captured_absmax(intermediates) -> dict[str, jax.Array]:
    """Dotted BitLinear path -> per-token input absmax (all calls of the module concatenated)."""
    out = {}
    for path, var in nnx.to_flat_state(intermediates):
        if path[-1] == "input_absmax":
            out[".".join(map(str, path[:-1]))] = jnp.concatenate([v.reshape(-1) for v in var.get_value()])
    return out


def measure(graphdef: nnx.GraphDef, params, previous: dict[str, jax.Array], tokens_BxT1: jax.Array | None):
    """Returns ``(stats, ternary_now)``: ``stats`` maps ``<path>/<stat>`` to float32 scalars;
    ``ternary_now`` the int8 pattern of every BitLinear, to feed back as ``previous``."""
    model = nnx.merge(graphdef, params)
    linears = _bitlinears(model)
    for lin in linears.values():
        lin.capture_input = True
    absmax = {}
    if tokens_BxT1 is not None:
        _, intermediates = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, tokens_BxT1[:, :-1])
        absmax = _captured_absmax(intermediates)

    stats, now = {}, {}
    totals = {"n": 0.0, "neg": 0.0, "zero": 0.0, "pos": 0.0, "flips": 0.0, "sq": 0.0}
    for name, lin in linears.items():
        w = lin.weight[...].astype(jnp.float32)
        t, gamma = ternary(w)
        n = w.size
        neg, zero, pos = jnp.sum(t < 0), jnp.sum(t == 0), jnp.sum(t > 0)
        sq = jnp.sum(w * w)
        now[name] = t.astype(jnp.int8)
        stats.update({
            f"{name}/frac_neg": neg / n, f"{name}/frac_zero": zero / n, f"{name}/frac_pos": pos / n,
            f"{name}/gamma": gamma, f"{name}/latent_rms": jnp.sqrt(sq / n),
        })
        if name in absmax:
            stats[f"{name}/act_absmax_mean"] = jnp.mean(absmax[name])
            stats[f"{name}/act_absmax_max"] = jnp.max(absmax[name])
        flips = jnp.sum(now[name] != previous[name])
        stats[f"{name}/flip_rate"] = flips / n
        totals["flips"] += flips
        for key, value in (("n", n), ("neg", neg), ("zero", zero), ("pos", pos), ("sq", sq)):
            totals[key] += value
    n = totals["n"]
    stats.update({
        "model/frac_neg": totals["neg"] / n, "model/frac_zero": totals["zero"] / n,
        "model/frac_pos": totals["pos"] / n, "model/latent_rms": jnp.sqrt(totals["sq"] / n),
        "model/gamma_mean": jnp.mean(jnp.stack([stats[f"{k}/gamma"] for k in linears])),
    })
    if absmax:
        stats["model/act_absmax_max"] = jnp.max(jnp.stack([jnp.max(a) for a in absmax.values()]))
    stats["model/flip_rate"] = totals["flips"] / n
    return {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}, now


def zero_pattern(graphdef: nnx.GraphDef, params) -> dict[str, jax.Array]:
    """An all-zero int8 ternary pattern per BitLinear: the stand-in ``previous`` of a first
    measurement (its flip rates are dropped)."""
    linears = _bitlinears(nnx.merge(graphdef, params))
    return {name: jnp.zeros(lin.weight[...].shape, jnp.int8) for name, lin in linears.items()}


def _weight_shardings(params, names) -> dict[str, jax.sharding.Sharding]:
    """The sharding of each named BitLinear's weight (``<name>.weight`` in ``params``)."""
    by_path = {".".join(map(str, path)): v.get_value().sharding for path, v in nnx.to_flat_state(params)}
    return {name: by_path[f"{name}.weight"] for name in names}


class BitNetMetrics:
    """Call with the live params every ``log.metrics_every`` steps; returns host floats by TB tag.

    Keeps the previous ternary pattern on the device (int8, one byte per linear weight, laid out
    like the weight) for flip rates. ``tokens_BxT1`` is one held-out batch (a device array,
    ``[B, T + 1]``); None skips the activation statistics."""

    def __init__(self, graphdef: nnx.GraphDef, tokens_BxT1: jax.Array | None):
        self.graphdef = graphdef
        self.tokens = tokens_BxT1
        self._previous: dict[str, jax.Array] | None = None
        self._measure = jax.jit(lambda p, prev, x: measure(graphdef, p, prev, x))

    def _first_previous(self, params) -> dict[str, jax.Array]:
        # Laid out like the pattern measure() returns (the weight's sharding): the same executable
        # then serves the first call and every later one.
        fn = lambda p: zero_pattern(self.graphdef, p)
        names = jax.eval_shape(fn, params).keys()
        return jax.jit(fn, out_shardings=_weight_shardings(params, names))(params)

    def __call__(self, params) -> dict[str, float]:
        first = self._previous is None
        previous = self._first_previous(params) if first else self._previous
        stats, self._previous = self._measure(params, previous, self.tokens)
        return {f"{PREFIX}/{k}": float(v) for k, v in jax.device_get(stats).items()
                if not (first and k.endswith("/flip_rate"))}
