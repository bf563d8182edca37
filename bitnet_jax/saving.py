"""The loop's checkpoint hooks: save at every ``checkpoint.every`` step, at the mandatory steps and
when the session ends; say when each save is on disk; stop the run at once when a background save
failed.

Before a save is queued the TensorBoard writer is flushed, so every step a checkpoint covers is on
disk before that checkpoint can commit: a kill -9 right after a commit loses no logged step that
the resumed run would not recompute.
"""

from __future__ import annotations

import time
from typing import Callable

from bitnet_jax.checkpoint import CheckpointManager
from bitnet_jax.run_dir import checkpoints_dir, mandatory_steps
from bitnet_jax.config import Config
from bitnet_jax.hooks import Hook, StepInfo


class Checkpointing:
    """``save_hook`` (needs the state) and ``watch_hook`` (every step, one behind: background errors
    and commits). ``data_state()`` gives the loader's position; ``halted()`` True means nothing from
    the bad step on may be saved (``train.on_nan: halt``)."""

    def __init__(self, cfg: Config, ckpt: CheckpointManager, *, data_state: Callable[[], dict],
                 resumables: dict, halted: Callable[[], bool], tb, say: Callable[[str], None]):
        self.cfg, self.ckpt = cfg, ckpt
        self.data_state, self.resumables, self.halted = data_state, resumables, halted
        self.tb, self.say = tb, say
        self._queued: dict[int, float] = {}  # step -> when its save was queued, until it is on disk

    def save_hook(self) -> Hook:
        return Hook("checkpoint", self.save, every=self.cfg.checkpoint.every,
                    steps=frozenset(mandatory_steps(self.cfg)), needs_state=True, at_exit=True, timed=True)

    def watch_hook(self) -> Hook:
        return Hook("checkpoint_watch", self.watch)

    def save(self, info: StepInfo) -> None:
        # At exit the step may be saved already (a save step); after a halt nothing more is saved.
        if not self.halted() and self.ckpt.last_saved != info.step:
            self.tb.flush()
            self.ckpt.save(info.step, info.state, data_state=self.data_state(), resumables=self.resumables)
            self._queued[info.step] = time.perf_counter()
        if info.final:  # the session ends: every queued save must be on disk first
            self.ckpt.wait()
            self.watch(info)

    def watch(self, info: StepInfo) -> None:
        self.ckpt.check_background_errors(info.step)  # host-side: never waits for the device or the disk
        for step in [s for s in self._queued if (checkpoints_dir(self.ckpt.run_dir) / str(s)).is_dir()]:
            took = time.perf_counter() - self._queued.pop(step)
            self.say(f"checkpoint {step} saved ({took:.1f} s after it was queued)")
