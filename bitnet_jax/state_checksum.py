"""Checksums of a saved step: a 64-bit hash of every array of the state, computed on device, and a
SHA-256 of the data and meta items, stored in the step's meta item and compared on every restore.

Why: Orbax's zstd frames carry no checksum, so bytes flipped inside a compressed array chunk
decode to wrong numbers without any error, and the JSON items (the data position, the step's
metadata) can be edited without any error either.

The array hash is, per leaf, two sums modulo 2**32 over its elements ``i`` of ``mix(bits_i ^ seed +
index_i)`` (``mix``: the murmur3 32-bit finalizer, a bijection). Integer addition is associative
and commutative, so the value is exactly the same however the array is sharded or the reduction is
ordered (a jitted reduction over a global array: every process gets the same value). A change of any
single element changes exactly one term by a bijection, so it always changes the sum (a one-bit flip
is always detected); several changed elements go unnoticed with probability about 2**-64. The
position index makes swapped elements count as a change.

Cost: a few integer operations per element, dispatched asynchronously (the train loop does not wait
for it); the 16-byte results are fetched in the background save thread. See benchmarks/README.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "bitnet_jax.state_checksum/1"
_SEEDS = (0x9E3779B9, 0x85EBCA6B)  # two independent lanes: a 64-bit hash without 64-bit integers


def _mix(h):
    """murmur3's fmix32: a bijection on uint32 that spreads every input bit over all output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x) -> jax.Array:
    """The bit pattern of ``x`` as uint32 elements (64-bit types: two per element)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """Each element's row-major position (mod 2**32), built from iotas so it shards like the array."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_hash(x) -> jax.Array:
    bits = _bits(x)
    index = _flat_index(bits.shape)
    lanes = [jnp.sum(_mix((bits ^ jnp.uint32(seed)) + index * jnp.uint32(0x27D4EB2F) + jnp.uint32(seed)),
                     dtype=jnp.uint32)
             for seed in _SEEDS]
    size = jnp.uint32(bits.size % 2**32)  # an empty array and a reshaped one differ from the rest
    return jnp.stack(lanes) ^ size


_tree_hash = jax.jit(lambda leaves: [_leaf_hash(x) for x in leaves])


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def array_hashes(tree) -> dict[str, jax.Array]:
    """Dispatches the hash of every leaf of ``tree`` (arrays, possibly sharded over devices or
    processes) and returns at once: leaf path ('params/layers/0/mlp/down_proj/weight') -> a uint32[2]
    device array. Pass the result to ``fetch`` (it blocks until computed)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [_path_name(path) for path, _ in flat]
    return dict(zip(names, _tree_hash([leaf for _, leaf in flat])))


def _host(x) -> np.ndarray:
    # A reduction's result is replicated: every process holds the whole value (no collective needed).
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def fetch(hashes: dict[str, jax.Array]) -> dict[str, str]:
    """``array_hashes`` as host values: path -> 16 hex digits. Blocks until they are computed."""
    return {name: "".join(f"{int(v):08x}" for v in _host(h)) for name, h in hashes.items()}


def json_hash(obj: Any) -> str:
    """SHA-256 of ``obj`` as JSON would store it (a round trip first: tuples, int keys and key order
    come back from disk differently from how they went in)."""
    canonical = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def record(arrays: dict[str, str], data: Any, meta: dict) -> dict:
    """What a step's meta item stores under ``"checksum"`` (``meta`` without that key)."""
    return {"format": FORMAT, "arrays": arrays, "data": json_hash(data), "meta": json_hash(meta)}


def mismatch(stored: dict, *, arrays: dict[str, str] | None = None, data: Any = None,
             meta: dict | None = None) -> str | None:
    """What differs between ``stored`` (a ``record``) and what was read back: the arrays read (a
    subset of the stored leaves may be given, e.g. the params only), the data item, the meta item
    (without ``"checksum"``); None when all that was given matches."""
    if stored.get("format") != FORMAT:
        return f"its checksum is in an unknown format {stored.get('format')!r}"
    if meta is not None and json_hash(meta) != stored.get("meta"):
        return "the meta item does not match its checksum (meta/metadata was changed)"
    if data is not None and json_hash(data) != stored.get("data"):
        return "the data item does not match its checksum (data/metadata was changed: the data position is wrong)"
    want = stored.get("arrays") or {}
    for name, value in (arrays or {}).items():
        if name not in want:
            return f"the array {name} has no stored checksum"
        if value != want[name]:
            return f"the array {name} does not match its checksum (its file contents changed after the save)"
    return None
