"""Held-out evaluation: the mean loss over fixed batches, with perplexity and the train/eval gap."""

from __future__ import annotations

import math

import jax
import numpy as np

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
