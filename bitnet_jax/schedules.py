"""Two-stage learning-rate and weight-decay schedules (BitNet b1.58 training recipe).

``t`` is the optimizer update count (0 for the first update), ``T`` the total steps, ``W`` the warm-up
steps, ``S`` the stage switch (first step of stage 2).

Learning rate:
  t < W:        peak_1 * t / W                                   (linear warm-up from 0)
  W <= t < S:   min_lr + (peak_1 - min_lr) * shape(p)
  t >= S:       min_lr + (peak_2 - min_lr) * shape(p)             (abrupt drop at the switch)
  with p = (t - W) / (T - W) and shape = 1 - p (``linear``) or (1 + cos(pi p)) / 2 (``cosine``),
  so with min_lr = 0 the linear stage 1 is ``peak_1 * (T - t) / (T - W)``, and stage 2 follows the
  same line scaled to peak_2.

Weight decay (decoupled, AdamW):
  t < S: wd (``constant``) or wd * (1 + cos(pi t / S)) / 2 (``cosine``: peak at the start of stage 1,
         reaching 0 at the switch);  t >= S: 0.
"""

import jax.numpy as jnp
import optax

from bitnet_jax.config import Config


def _shape(kind: str, remaining):
    """The decay factor from the fraction of the stage's horizon still ahead, ``1 - p``.

    Written in terms of what remains, and the cosine as ``sin^2(pi r / 2) = (1 + cos(pi p)) / 2``,
    so the last steps keep float32 precision."""
    return remaining if kind == "linear" else jnp.square(jnp.sin(0.5 * jnp.pi * remaining))


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
    o, total, switch = cfg.optim, cfg.train.steps, cfg.stage_switch
    warmup = o.warmup_steps

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = o.peak_lr_1 * t / max(warmup, 1)
        remaining = jnp.clip((total - t) / max(total - warmup, 1), 0.0, 1.0)
        peak = jnp.where(t < switch, o.peak_lr_1, o.peak_lr_2)
        decay = o.min_lr + (peak - o.min_lr) * _shape(o.lr_shape, remaining)
        return jnp.where(t < warmup, warm, decay)

    return schedule


def weight_decay_schedule(cfg: Config) -> optax.Schedule:
    o, switch = cfg.optim, cfg.stage_switch

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        stage1 = o.weight_decay * (_shape("cosine", (switch - t) / switch) if o.wd_shape == "cosine" else 1.0)
        return jnp.where(t < switch, stage1, 0.0)

    return schedule


def stage(cfg: Config, count):
    """1 before the switch, 2 from it on (for the update with this count)."""
    return jnp.where(jnp.asarray(count) < cfg.stage_switch, 1, 2)
