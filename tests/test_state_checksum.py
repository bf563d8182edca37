"""The state checksum (bitnet_jax/state_checksum.py): one flipped bit in any leaf changes it, the
same arrays give the same value, and sharding over devices does not change it."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import state_checksum as sc

REPO = Path(__file__).resolve().parents[1]


def sample_tree():
    rng = np.random.default_rng(0)
    return {"step": jnp.asarray(7, jnp.int32), "key": jax.random.PRNGKey(3),
            "params": {"w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
                       "b": jnp.asarray(rng.standard_normal(16), jnp.bfloat16),
                       "mask": jnp.asarray(rng.integers(0, 2, 5), jnp.bool_)}}


def flip_bit(x, index: int, bit: int):
    """``x`` with one bit of element ``index`` (flat) flipped, through its bit pattern."""
    a = np.asarray(x).reshape(-1)
    raw = a.view(np.uint8).copy()  # (bool and bfloat16 included)
    raw[index * a.dtype.itemsize + bit // 8] ^= np.uint8(1 << (bit % 8))
    return jnp.asarray(raw.view(a.dtype).reshape(x.shape))


def test_the_same_arrays_give_the_same_value_and_every_single_bit_flip_is_seen():
    tree = sample_tree()
    base = sc.fetch(sc.array_hashes(tree))
    assert base == sc.fetch(sc.array_hashes(jax.tree.map(lambda x: jnp.array(x, copy=True), tree)))
    assert sorted(base) == ["key", "params/b", "params/mask", "params/w", "step"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for i, (path, leaf) in enumerate(flat):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        bits = 1 if leaf.dtype == jnp.bool_ else leaf.dtype.itemsize * 8
        for index in {0, leaf.size // 2, leaf.size - 1}:
            for bit in range(bits):
                leaves = [x for _, x in flat]
                leaves[i] = flip_bit(leaf, index, bit)
                got = sc.fetch(sc.array_hashes(jax.tree_util.tree_unflatten(treedef, leaves)))
                assert got[name] != base[name], (name, index, bit)
                assert {k: v for k, v in got.items() if k != name} == {k: v for k, v in base.items() if k != name}


def test_swapped_elements_change_it():
    w = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    swapped = w.at[0, 0].set(w[0, 1]).at[0, 1].set(w[0, 0])
    assert sc.fetch(sc.array_hashes({"w": w})) != sc.fetch(sc.array_hashes({"w": swapped}))


def test_json_items_hash_as_stored_and_a_changed_field_is_named():
    data = {"processes": [{"skip_tokens": 1024, "position": (1, 2)}], "format": "f"}
    meta = {"step": 8, "config": {1: "a"}}
    stored = sc.record({"w": "00"}, data, meta)
    import json
    assert sc.mismatch(stored, arrays={"w": "00"}, data=json.loads(json.dumps(data)),
                       meta=json.loads(json.dumps(meta))) is None
    assert "data item" in sc.mismatch(stored, data={**data, "processes": [{"skip_tokens": 1025, "position": [1, 2]}]})
    assert "meta item" in sc.mismatch(stored, meta={**meta, "step": 9})
    assert "array w" in sc.mismatch(stored, arrays={"w": "01"})


SHARDED = r'''
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from bitnet_jax import state_checksum as sc
assert len(jax.devices()) == 4
rng = np.random.default_rng(1)
tree = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal(16), jnp.bfloat16)}
single = sc.fetch(sc.array_hashes(tree))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
for spec_w, spec_v in ((P("data", "model"), P("data")), (P(None, "model"), P(("data", "model"))), (P(), P())):
    placed = {"w": jax.device_put(tree["w"], NamedSharding(mesh, spec_w)),
              "v": jax.device_put(tree["v"], NamedSharding(mesh, spec_v))}
    assert sc.fetch(sc.array_hashes(placed)) == single, spec_w
print("OK", single)
'''


def test_the_value_does_not_depend_on_sharding():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr[-3000:]
