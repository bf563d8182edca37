"""What the checkpoint checksum (bitnet_jax/state_checksum.py) costs, on the full train state.

    python benchmarks/bench_checksum.py                         # the 95M state (params + Adam), 3 repeats
    python benchmarks/bench_checksum.py --config configs/tiny.yaml --repeats 5

Prints a table (median of the repeats, the jit compile excluded):
  checksum dispatch      what a save adds to the time it holds the train loop (the hash is enqueued
                         behind the save's device copy; its values are fetched in the background thread)
  checksum compute       the hash of every leaf, dispatched and fetched (device time)
  save hold              CheckpointManager.save as the loop sees it (checksum dispatch included)
  save hold, no checksum the same with the checksum left out (as before it existed)
  restore (no verify)    the Orbax read of the step
  restore verify         what verification adds to a restore (hash of the restored arrays, compare)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "bitnet_95m.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax

    from bitnet_jax import config as config_lib
    from bitnet_jax import sharding, state_checksum, train_state
    from bitnet_jax.checkpoint import CheckpointManager
    from bitnet_jax.open_step import open_step
    from bitnet_jax.state_tree import to_tree

    cfg = config_lib.load(args.config, args.overrides + ["checkpoint.every=1", "checkpoint.keep_last=1"])
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, state = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state, mesh)
    tree = to_tree(state)
    jax.block_until_ready(tree)
    n = sum(x.size for x in jax.tree.leaves(tree))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    state_checksum.fetch(state_checksum.array_hashes(tree))  # compile

    rows: dict[str, list[float]] = {k: [] for k in ("checksum dispatch", "checksum compute", "save hold",
                                                    "save hold, no checksum", "restore (no verify)",
                                                    "restore verify")}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        mngr = CheckpointManager(run_dir, cfg)
        for i in range(args.repeats):
            hashes = None

            def dispatch():
                nonlocal hashes
                hashes = state_checksum.array_hashes(tree)

            rows["checksum dispatch"].append(timed(dispatch))
            state_checksum.fetch(hashes)
            rows["checksum compute"].append(timed(lambda: state_checksum.fetch(state_checksum.array_hashes(tree))))
            rows["save hold"].append(timed(lambda: mngr.save(2 * i + 1, state, data_state={"i": i})))
            mngr.wait()
            real, state_checksum.array_hashes = state_checksum.array_hashes, lambda t: {}  # as before checksums
            try:
                rows["save hold, no checksum"].append(timed(lambda: mngr.save(2 * i + 2, state, data_state={"i": i})))
                mngr.wait()
            finally:
                state_checksum.array_hashes = real
        mngr.close()
        abstract = train_state.abstract_state(cfg)[1]
        for _ in range(args.repeats):
            opened = open_step(run_dir, 2 * args.repeats - 1, resuming=True)  # a step with a checksum
            reader = CheckpointManager(run_dir, opened.cfg, read_only=True)
            out = None

            def restore():
                nonlocal out
                out = reader.restore(opened.step, abstract, shardings, opened, verify=False)
                jax.block_until_ready(out[0])

            rows["restore (no verify)"].append(timed(restore))
            rows["restore verify"].append(timed(reader.verify_last_restore))
            reader.close()

    print(f"state: {n:,} elements, {state_bytes / 2**20:,.0f} MiB, on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}, {len(jax.devices())} device(s)); median of {args.repeats}")
    print(f"{'':24} {'ms':>10}")
    for name, values in rows.items():
        print(f"{name:24} {1000 * statistics.median(values):10.1f}")


if __name__ == "__main__":
    main()
