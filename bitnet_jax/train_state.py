"""The train state (one pytree) and the jitted train and eval steps.

The NNX model is split once into a static ``graphdef`` and a ``params`` state; the steps are pure
functions of ``TrainState`` and are ``jax.jit``-ed once with explicit shardings and the state donated,
so the hot loop never walks the NNX graph in Python.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from bitnet_jax import compile_options, schedules
from bitnet_jax.config import Config
from bitnet_jax.model import BitNetLM
from bitnet_jax.sharding import batch_sharding, microbatch_sharding, put_global, replicated, state_shardings


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates completed
    params: Any  # nnx.State of the model's Params (float32 master weights)
    opt_state: Any  # clipping + Adam moments
    key: jax.Array  # uint32[2] base PRNG key, checkpointed: any per-step randomness (none in the BitNet
    # b1.58 step today: no dropout) must be fold_in(key, step), so a resume reproduces it


def direction_transform(cfg: Config) -> optax.GradientTransformation:
    """Global-norm clipping then Adam's normalised direction; the scheduled learning rate and decoupled
    weight decay are applied in ``apply_adamw`` from the step counter, so a skipped (non-finite) update
    leaves every count and moment untouched while the schedule stays keyed on the step."""
    o = cfg.optim
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.scale_by_adam(o.beta1, o.beta2, o.eps))


def decay_mask(params) -> Any:
    """Decay matrices (linear weights, embedding); never norm weights (vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def apply_adamw(params, direction, lr, wd):
    """AdamW's update: ``p - lr * (adam_direction + wd * p)`` with wd only on masked (matrix) params."""
    mask = decay_mask(params)
    return jax.tree.map(lambda p, d, m: p - lr * (d + (wd * p if m else 0.0)), params, direction, mask)


def create_model(cfg: Config, seed: int | None = None) -> BitNetLM:
    return BitNetLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed if seed is None else seed))


def init_state(cfg: Config) -> tuple[nnx.GraphDef, TrainState]:
    model = create_model(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = direction_transform(cfg)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(cfg.train.seed + 1),
    )
    return graphdef, state


def abstract_state(cfg: Config) -> tuple[nnx.GraphDef, TrainState]:
    """Shapes and dtypes of the state without allocating it (for dry runs and restores)."""
    out = {}

    def build():
        graphdef, state = init_state(cfg)
        out["graphdef"] = graphdef
        return state

    shapes = jax.eval_shape(build)
    return out["graphdef"], shapes


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in float32."""
    with jax.named_scope("loss"):
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                               targets_BxT).mean()


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable:
    def loss_fn(params, batch_BxT1: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        return cross_entropy(model(batch_BxT1[:, :-1]), batch_BxT1[:, 1:])

    return loss_fn


def make_loss_and_grads(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh) -> Callable:
    """``loss_and_grads(params, batch) -> (mean loss, grads)`` over the whole global batch.

    With ``train.grad_accum = A`` the batch is split into A micro-batches whose gradients are averaged
    in a ``lax.scan`` (same result as one big batch, up to float summation order). Micro-batch j takes
    rows j, j + A, j + 2A, ...: every device keeps its own rows, so no micro-batch moves between devices.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef))
    accum = cfg.train.grad_accum

    def loss_and_grads(params, batch):
        if accum == 1:
            return grad_fn(params, batch)
        micro = batch.reshape(batch.shape[0] // accum, accum, batch.shape[1]).swapaxes(0, 1)
        micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding(mesh))

        def body(carry, mb):
            loss, grads = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / accum, (loss, grads))

    return loss_and_grads


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, state_sharding) -> Callable:
    """Returns ``train_step(state, batch) -> (state, metrics)``, jitted with donation of ``state``.

    ``batch`` is int32 ``[global_batch, seq_len + 1]`` (gradient accumulation: ``make_loss_and_grads``).
    ``metrics`` holds scalars: loss, grad_norm (before clipping), lr, wd, stage, and ``skipped`` (1 when
    the loss or gradients were not finite and the update was dropped).
    """
    tx = direction_transform(cfg)
    loss_and_grads = make_loss_and_grads(cfg, graphdef, mesh)
    lr_fn, wd_fn = schedules.learning_rate_schedule(cfg), schedules.weight_decay_schedule(cfg)

    def train_step(state: TrainState, batch: jax.Array):
        loss, grads = loss_and_grads(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        lr, wd = lr_fn(state.step), wd_fn(state.step)
        params = apply_adamw(state.params, direction, lr, wd)
        # A non-finite update is dropped whole: params and moments stay as they were.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "wd": wd,
            "stage": schedules.stage(cfg, state.step),
            "skipped": (~finite).astype(jnp.int32),
        }
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compile_options.for_backend(),
    )


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, params_sharding) -> Callable:
    """``eval_step(params, batch) -> mean loss`` (float32 scalar), jitted."""
    return jax.jit(
        make_loss_fn(graphdef),
        in_shardings=(params_sharding, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
        compiler_options=compile_options.for_backend(),
    )


def place_state(state: TrainState, mesh: Mesh) -> tuple[TrainState, Any]:
    """Puts a host or single-device state onto the mesh; returns it and its shardings."""
    shardings = state_shardings(state, mesh)
    return put_global(state, shardings), shardings
