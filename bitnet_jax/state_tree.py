"""A train state as the plain tree a checkpoint stores: nested dicts keyed by field and parameter
names, e.g. ``{"step", "key", "params": {"layers": {"0": {"mlp": {"down_proj": {"weight"}}}}},
"opt_state": {"1": {"count", "mu", "nu"}}}``, and the shape check of a stored tree against a model.

No Orbax here: checkpoint.py hands these trees to Orbax and back.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from bitnet_jax.run_dir import CheckpointError


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _unwrap(tree):
    """nnx Variables -> their arrays (so key paths stop at the parameter name)."""
    return jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def _paths(tree) -> tuple[list[tuple[str, ...]], list[Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(_unwrap(tree))
    return [tuple(_key_name(k) for k in path) for path, _ in flat], [leaf for _, leaf in flat]


def to_tree(state) -> dict:
    """A TrainState (or any pytree) as nested dicts keyed by field / parameter names, the layout stored
    in ``state/``."""
    out: dict = {}
    for path, leaf in zip(*_paths(state)):
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return out


def from_tree(tree: dict, like):
    """Inverse of ``to_tree``: the values of ``tree`` in the structure of ``like``."""
    paths, _ = _paths(like)
    leaves = []
    for path in paths:
        node = tree
        for part in path:
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def abstract_tree(like, shardings=None) -> dict:
    """``to_tree(like)`` as ``jax.ShapeDtypeStruct`` leaves (with ``shardings``, a tree matching
    ``like``, as their shardings): what Orbax restores into."""
    tree = to_tree(like)
    sh = to_tree(shardings) if shardings is not None else jax.tree.map(lambda _: None, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shape_key(tree: dict) -> tuple:
    """Every entry's (dotted name, shape, dtype): equal keys pass ``check_shapes`` alike."""
    return tuple((name, tuple(x.shape), np.dtype(x.dtype).str) for name, x in sorted(_flat(tree).items()))


def check_shapes(stored: dict, expected: dict, where: str) -> None:
    """Raises a CheckpointError naming the first entry whose shape or dtype differs (both trees hold
    objects with ``.shape`` and ``.dtype``: arrays, ShapeDtypeStructs or Orbax array metadata)."""
    fs, fe = _flat(stored), _flat(expected)
    for name in sorted(fe, key=lambda n: not n.startswith("params.")):  # name a parameter if one differs
        if name not in fs:
            raise CheckpointError(f"{where} has no entry {name}: it was saved from a different model or "
                                  "optimizer; check model.* (and optim.*) against the checkpoint's config")
        s, e = fs[name], fe[name]
        if tuple(s.shape) != tuple(e.shape) or np.dtype(s.dtype) != np.dtype(e.dtype):
            raise CheckpointError(
                f"{where} does not match the model: {name} is {tuple(s.shape)} {np.dtype(s.dtype)} in the "
                f"checkpoint but {tuple(e.shape)} {np.dtype(e.dtype)} in the model; use the checkpoint's "
                "model.* settings (its config is stored in meta/metadata)")
    extra = sorted(set(fs) - set(fe))
    if extra:
        raise CheckpointError(f"{where} holds {extra[0]} which the model does not have; use the checkpoint's "
                              "model.* settings (its config is stored in meta/metadata)")
