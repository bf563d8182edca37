"""The device mesh and how arrays are laid out on it (JAX SPMD; no hand-written collectives).

Axes: ``data`` (batch split, gradients all-reduced by XLA) and ``fsdp`` (batch split too, and each
parameter / optimizer-state array split along its largest divisible axis).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bitnet_jax.config import ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fsdp = cfg.fsdp
    data = n // fsdp if cfg.data == -1 else cfg.data
    if data * fsdp != n:
        raise ConfigError(
            f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} does not match the {n} available "
            f"devices; set mesh.data=-1 to use all devices not taken by fsdp"
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a ``[batch, ...]`` array split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest axis that ``fsdp`` divides; small or indivisible arrays stay replicated."""
    if fsdp == 1 or not shape:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0 and shape[axis] >= fsdp:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """A sharding for every leaf of a (possibly abstract) state pytree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp)), abstract_state)


def global_batch(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assembles the global batch from this process's rows (each process passes its own shard)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)
