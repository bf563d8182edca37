"""Several processes (hosts) as one JAX program: ``jax.distributed.initialize`` from flags or env.

Every process runs the same ``train.py`` command with its own ``--process-id``; process 0's address
is the coordinator. Flags win over the environment::

    --coordinator HOST:PORT    JAX_COORDINATOR_ADDRESS
    --num-processes N          JAX_NUM_PROCESSES
    --process-id I             JAX_PROCESS_ID

``--coordinator auto`` leaves the coordinator (and any of the other two not given) to JAX's cluster
detection (SLURM, Open MPI, Kubernetes JobSet, TPU pods). Nothing given (or N = 1): a single process, and nothing is initialised.

After ``initialize`` returns, ``jax.devices()`` lists the devices of every process; the mesh spans
them all (``sharding.make_mesh``). Must run before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from bitnet_jax.config import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits; all None with ``coordinator == 'auto'`` (JAX detects the cluster)."""

    coordinator: str
    num_processes: int | None
    process_id: int | None


def _int(name: str, value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            env: Mapping[str, str] | None = None) -> ProcessGroup | None:
    """The process group from flags, falling back to the environment; None for a single process.

    Raises ConfigError, before any compute, for a half-given or inconsistent group."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = _int("--num-processes", num_processes if num_processes is not None
                         else env.get(ENV_NUM_PROCESSES))
    process_id = _int("--process-id", process_id if process_id is not None else env.get(ENV_PROCESS_ID))

    if coordinator == AUTO:
        return ProcessGroup(AUTO, num_processes, process_id)
    if num_processes == 1 and process_id in (None, 0):
        return None  # a group of one is a plain single-process run
    if coordinator is None and process_id is None and num_processes is None:
        return None
    missing = [name for name, value in (("--coordinator HOST:PORT", coordinator),
                                        ("--num-processes N", num_processes),
                                        ("--process-id I", process_id)) if value is None]
    if missing:
        raise ConfigError(
            f"a multi-process run needs all of --coordinator, --num-processes and --process-id (or "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: {', '.join(missing)}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0, e.g. 10.0.0.1:1234")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id} is outside [0, {num_processes}): number the processes "
                          f"0 to {num_processes - 1}, process 0 at the coordinator address")
    return ProcessGroup(coordinator, num_processes, process_id)


def initialize(group: ProcessGroup | None, timeout_s: int = 300) -> None:
    """Joins the process group (blocks until all ``num_processes`` have joined, up to ``timeout_s``).

    CPU processes exchange arrays with gloo (``jax_cpu_collectives_implementation``); the setting only
    concerns the CPU backend, so GPU runs are unaffected."""
    if group is None:
        return
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("distributed.initialize must run before any JAX device is used "
                           "(call it first thing, before building the mesh or the model)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if group.coordinator == AUTO:  # JAX's cluster detection fills in whatever was not given
        jax.distributed.initialize(num_processes=group.num_processes, process_id=group.process_id,
                                   initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                                   initialization_timeout=timeout_s)
    # The first collective sets up the CPU (gloo) context and gives up if the processes reach it more
    # than 30 s apart. Right after joining they are in step; later, uneven start-up work (tokenizer,
    # fingerprint, loader) could spread them further than that on a busy machine.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("bitnet_jax: processes joined")


def broadcast_from_first(value: int) -> int:
    """Process 0's ``value`` on every process (e.g. the timestamp in a default run id)."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    # int32 halves: JAX arrays are 32-bit unless x64 is enabled.
    hi, lo = multihost_utils.broadcast_one_to_all(np.asarray([value >> 31, value & 0x7FFFFFFF], np.int32))
    return (int(hi) << 31) | int(lo)


def gather_json(obj) -> list:
    """Every process's ``obj`` (JSON-able), in process order; a collective when several processes run."""
    import json

    import jax
    import numpy as np

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]
