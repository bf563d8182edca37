"""Sampling from a BitNet LM with a KV cache: greedy, typical and stress modes, jitted once per shape.

One call generates ``max_new_tokens`` continuations for B rows that share one prompt length (the
periodic sampler runs the three modes of one prompt as a batch of 3; the CLI runs one row). The
prompt is right-padded to a bucket length so prompts of similar lengths share one compilation:
the padding's keys and values land in the cache beyond the prompt, and each decode step overwrites
the slot it then attends to, so the padding is never seen.

Each row has its own temperature / top-k / top-p, passed as arrays: all modes share one executable.
Randomness: step ``i`` of the decode loop uses ``fold_in(key, i)``; callers derive ``key`` with
``fold_in(base_key, train_step)`` so samples are reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this many tokens (fewer recompilations)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one row picks its next token: temperature 0 is greedy (argmax); ``top_k`` 0 and
    ``top_p`` 1.0 turn those filters off."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0


MODES: dict[str, Sampling] = {
    "greedy": Sampling(temperature=0.0),
    "typical": Sampling(temperature=0.9, top_p=0.95),
    "stress": Sampling(temperature=1.5, top_k=10),
}


# --------------------------------------------------------------------------- filters

def top_k_mask(logits_BxV: jax.Array, k_B: jax.Array) -> jax.Array:
    """True for the ``k`` highest logits of each row (ties with the k-th value kept too); k = 0 keeps all."""
    v = logits_BxV.shape[-1]
    sorted_desc = -jnp.sort(-logits_BxV, axis=-1)
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(k_B - 1, 0, v - 1)[:, None], axis=-1)
    return (logits_BxV >= kth) | (k_B[:, None] <= 0)


def top_p_mask(logits_BxV: jax.Array, p_B: jax.Array) -> jax.Array:
    """True for the smallest set of most likely tokens whose probability reaches ``p`` (nucleus);
    the most likely token is always kept; p >= 1 keeps all."""
    sorted_desc = -jnp.sort(-logits_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
    keep_sorted = mass_before < p_B[:, None]
    # The least likely kept logit is the row's threshold (-inf where a row keeps nothing extra).
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return (logits_BxV >= threshold) | (p_B[:, None] >= 1.0)


def next_token(logits_BxV: jax.Array, key: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
               top_p_B: jax.Array) -> jax.Array:
    """Samples int32 ``[B]`` tokens: temperature, then top-k, then top-p; argmax where temperature is 0."""
    logits = logits_BxV.astype(jnp.float32)
    scaled = logits / jnp.maximum(temperature_B, 1e-6)[:, None]
    scaled = jnp.where(top_k_mask(scaled, top_k_B), scaled, -jnp.inf)
    scaled = jnp.where(top_p_mask(scaled, top_p_B), scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature_B > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def entropy(logits_BxV: jax.Array) -> jax.Array:
    """Entropy (nats) of the model's own distribution ``softmax(logits)``, ``[B]``."""
    logp = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# --------------------------------------------------------------------------- the decode loop

@dataclasses.dataclass
class Generation:
    """Host results of one call: per row, the new tokens up to (not including) EOS, and the mean
    entropy (nats) of the model's next-token distribution over those steps."""

    tokens: list[list[int]]
    mean_entropy: list[float]
    stopped_at_eos: list[bool]


def padded_length(prompt_len: int, max_new_tokens: int, max_positions: int) -> int:
    """The bucket a prompt is padded to; raises ValueError if prompt + new tokens do not fit."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty: give at least one token (the tokenizer's BOS counts)")
    if prompt_len + max_new_tokens > max_positions:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"{max_positions} positions (model.max_position_embeddings); shorten the prompt or "
            "lower max_new_tokens")
    bucket = PROMPT_BUCKET * math.ceil(prompt_len / PROMPT_BUCKET)
    return min(bucket, max_positions - max_new_tokens)


class Generator:
    """``Generator(graphdef, eos_id)(params, prompt_ids, samplings, max_new_tokens, key)``.

    ``graphdef`` is the model's ``nnx.split(model, nnx.Param)`` graph; ``params`` any matching state
    (the live training params or a restored checkpoint). Compiles once per (rows, padded prompt
    length, max_new_tokens)."""

    def __init__(self, graphdef: nnx.GraphDef, *, max_positions: int, eos_id: int | None):
        self.graphdef = graphdef
        self.max_positions = max_positions
        self.eos_id = -1 if eos_id is None else int(eos_id)  # -1: never stops early
        self._jitted = jax.jit(self._generate, static_argnames=("max_new_tokens",))

    def padded_length(self, prompt_len: int, max_new_tokens: int) -> int:
        return padded_length(prompt_len, max_new_tokens, self.max_positions)

    def __call__(self, params, prompt_ids: Sequence[int], samplings: Sequence[Sampling],
                 max_new_tokens: int, key: jax.Array) -> Generation:
        """Generates one continuation of ``prompt_ids`` per entry of ``samplings``."""
        n, rows = len(prompt_ids), len(samplings)
        width = self.padded_length(n, max_new_tokens)
        prompt = np.zeros((rows, width), np.int32)
        prompt[:, :n] = np.asarray(prompt_ids, np.int32)
        out = self._jitted(
            params, prompt, jnp.int32(n), key,
            jnp.asarray([s.temperature for s in samplings], jnp.float32),
            jnp.asarray([s.top_k for s in samplings], jnp.int32),
            jnp.asarray([s.top_p for s in samplings], jnp.float32),
            max_new_tokens=max_new_tokens)
        tokens, lengths, entropy_sum, eos = jax.device_get(out)
        return Generation(
            tokens=[row[:length].tolist() for row, length in zip(tokens, lengths)],
            mean_entropy=[float(e / max(length, 1)) for e, length in zip(entropy_sum, lengths)],
            stopped_at_eos=[bool(x) for x in eos],
        )

    def _generate(self, params, prompt_BxP, prompt_len, key, temperature_B, top_k_B, top_p_B, *,
                  max_new_tokens: int):
        model = nnx.merge(self.graphdef, params)
        b, p = prompt_BxP.shape
        caches = model.init_cache(b, p + max_new_tokens)
        # Prefill: the whole (padded) prompt at once; the next token comes from the last real position.
        logits_BxPxV, caches = model(prompt_BxP, caches=caches, cache_index=jnp.int32(0))
        last = jax.lax.dynamic_index_in_dim(logits_BxPxV, prompt_len - 1, axis=1, keepdims=False)

        def pick(logits_BxV, i):
            return next_token(logits_BxV, jax.random.fold_in(key, i), temperature_B, top_k_B, top_p_B)

        def record(carry, logits_BxV, i):
            tokens, length, ent, done = carry
            tok = pick(logits_BxV, i)
            live = ~done
            hit_eos = live & (tok == self.eos_id)
            tokens = tokens.at[:, i].set(jnp.where(live, tok, self.eos_id))
            length = length + (live & ~hit_eos)
            ent = ent + jnp.where(live & ~hit_eos, entropy(logits_BxV), 0.0)
            return tokens, length, ent, done | hit_eos

        init = (jnp.full((b, max_new_tokens), self.eos_id, jnp.int32), jnp.zeros((b,), jnp.int32),
                jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool))
        carry = record(init, last, 0)

        def cond(state):
            i, _, (_, _, _, done) = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, caches, carry = state
            prev = jax.lax.dynamic_index_in_dim(carry[0], i - 1, axis=1, keepdims=True)  # [B, 1]
            logits, caches = model(prev, caches=caches, cache_index=prompt_len + i - 1)
            return i + 1, caches, record(carry, logits[:, 0], i)

        _, _, (tokens, length, ent, done) = jax.lax.while_loop(cond, body, (jnp.int32(1), caches, carry))
        return tokens, length, ent, done


# --------------------------------------------------------------------------- sample statistics

def repeated_ngram_fraction(tokens: Sequence[int], n: int = 4) -> float:
    """Share of the sample's n-grams that already occurred earlier in it (0: none repeat; near 1: a
    loop). 0.0 when the sample has fewer than n tokens."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
