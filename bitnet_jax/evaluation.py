"""Held-out evaluation: the mean loss over fixed batches, with perplexity and the train/eval gap."""

from __future__ import annotations

import math

import jax
import numpy as np

from bitnet_jax.hooks import Hook, StepInfo
from bitnet_jax.sharding import global_batch


class Evaluator:
    """Evaluates ``params`` on the same held-out batches every time."""

    def __init__(self, eval_step, batches: list[np.ndarray], mesh):
        self.eval_step = eval_step
        self.batches = [global_batch(b, mesh) for b in batches]

    def __call__(self, params) -> float:
        losses = [self.eval_step(params, b) for b in self.batches]  # dispatched back to back
        return float(np.mean(jax.device_get(losses)))


def eval_scalars(eval_loss: float, train_loss: float | None) -> dict[str, float]:
    out = {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 80.0))}
    if train_loss is not None:
        out["eval/train_eval_gap"] = eval_loss - train_loss
    return out


class PeriodicEval:
    """The eval hook: every ``eval.every`` steps and at the run's last step, the held-out loss, its
    perplexity and the gap to the mean train loss since the previous eval (``metrics``' history, which
    rides with checkpoints, so the first gap after a resume matches an uninterrupted run)."""

    def __init__(self, evaluator: Evaluator, metrics, tb, say, *, every: int, last_step: int, start_step: int):
        self.evaluator, self.metrics, self.tb, self.say = evaluator, metrics, tb, say
        self.every, self.last_step = every, last_step
        self.previous = start_step // every * every if every else start_step  # the eval made last
        self.loss: float | None = None

    def hook(self) -> Hook:
        return Hook("eval", self, every=self.every, steps=frozenset({self.last_step}) if self.every else frozenset(),
                    needs_state=True, timed=True)

    def __call__(self, info: StepInfo) -> None:
        self.loss = self.evaluator(info.state.params)
        values = eval_scalars(self.loss, self.metrics.mean_loss_since(self.previous))
        self.tb.scalars(info.step, values)
        gap = values.get("eval/train_eval_gap")
        self.say(f"eval at step {info.step}: loss {self.loss:.4f}, perplexity {values['eval/perplexity']:.2f}"
                 + (f", train-eval gap {gap:+.4f}" if gap is not None else ""))
        self.previous = info.step
