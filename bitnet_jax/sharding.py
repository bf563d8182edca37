"""The device mesh and how arrays are laid out on it (JAX SPMD; no hand-written collectives).

Axes: ``data`` (batch split, gradients all-reduced by XLA) and ``fsdp`` (batch split too, and each
parameter / optimizer-state matrix split along its largest divisible axis; XLA all-gathers a weight
right before it is used and reduce-scatters its gradient). ``mesh.fsdp = 1`` is plain data
parallelism with replicated parameters.

Several processes (hosts): every process builds the same mesh over ``jax.devices()`` (all devices of
all processes, ordered by process), passes its own rows of each global batch to ``global_batch``,
and places the (identical, seeded) initial state with ``place_state``, which copies only the shards
its own devices hold.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitnet_jax.config import Config, ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

    ``fsdp`` is the inner (fastest varying) axis, so an FSDP group is made of neighbouring devices:
    the same host, where the all-gathers are cheapest."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fsdp = cfg.fsdp
    if n % fsdp:
        raise ConfigError(f"mesh.fsdp ({fsdp}) must divide the number of devices ({n}); "
                          f"choose a divisor of {n}")
    data = n // fsdp if cfg.data == -1 else cfg.data
    if data * fsdp != n:
        raise ConfigError(
            f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} does not match the {n} available "
            f"devices; set mesh.data=-1 to use all devices not taken by fsdp"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def check_batch_fits(cfg: Config, mesh: Mesh) -> None:
    """Every device must get whole rows of every micro-batch: a clear error before any compute."""
    n = mesh.devices.size
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % n:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {cfg.train.batch_size} / {cfg.train.grad_accum} = {micro} "
            f"rows per micro-batch cannot be split over the {n} devices of the mesh; make it a multiple of {n}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a ``[batch, ...]`` array split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """``[micro_batches, rows, ...]``: the rows of every micro-batch split over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest axis of a matrix that ``fsdp`` divides; vectors (norm weights), scalars and
    indivisible arrays stay replicated (they are small, and gathering them costs more than it saves)."""
    if fsdp == 1 or len(shape) < 2:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(params, mesh: Mesh):
    """A sharding for every leaf of a params-shaped tree (params, gradients, Adam moments)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp)), params)


def state_shardings(abstract_state, mesh: Mesh):
    """A sharding for every leaf of a (possibly abstract) state pytree: matrices of ``params`` and
    ``opt_state`` FSDP-sharded (when ``mesh.fsdp > 1``), everything else (step, key, counts)
    replicated."""
    if not hasattr(abstract_state, "params"):
        return param_shardings(abstract_state, mesh)
    rep = replicated(mesh)
    return abstract_state.replace(
        step=rep,
        key=rep,
        params=param_shardings(abstract_state.params, mesh),
        opt_state=param_shardings(abstract_state.opt_state, mesh),
    )


def put_global(tree, shardings):
    """Places a tree of host (or single-device) arrays, identical on every process, on the mesh.

    One process: ``jax.device_put``. Several: each process copies only the slices its own devices hold
    (``make_array_from_callback``), with no cross-host traffic and no equality check."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, s):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def global_batch(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles the global batch from this process's rows (each process passes its own shard:
    ``[global_batch / process_count, ...]``, the rows that follow process ``i-1``'s)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)


def describe(tree: Any) -> dict[str, str]:
    """``{leaf path: partition spec}`` of a tree of arrays, for logs and tests."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): str(getattr(leaf.sharding, "spec", leaf.sharding)) for path, leaf in flat}
