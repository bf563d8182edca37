"""The train step: AdamW equivalence, the decay mask, and learning on a fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bitnet_jax import sharding, train_state
from bitnet_jax.config import from_dict

SMALL = {"model": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 48, "max_position_embeddings": 16},
         "train": {"steps": 40, "batch_size": 4, "seq_len": 16},
         "optim": {"warmup_steps": 4, "peak_lr_1": 1e-2, "peak_lr_2": 5e-3}}


def _setup(overrides=None):
    cfg = from_dict({**SMALL, **(overrides or {})})
    graphdef, state = train_state.init_state(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    state, shardings = train_state.place_state(state, mesh)
    return cfg, graphdef, state, mesh, train_state.make_train_step(cfg, graphdef, mesh, shardings)


def test_decay_mask_excludes_norm_weights():
    _, state = train_state.init_state(from_dict(SMALL))
    flat = {tuple(p): m.get_value() for p, m in nnx.to_flat_state(train_state.decay_mask(state.params))}
    assert flat[("embed_tokens",)] is True
    assert flat[("layers", 0, "self_attn", "q_proj", "weight")] is True
    assert flat[("layers", 0, "input_layernorm", "weight")] is False
    assert flat[("norm", "weight")] is False


def test_update_equals_optax_adamw_with_clipping():
    """Our clip + Adam direction + scheduled AdamW equals optax's adamw at the same lr and wd."""
    cfg = from_dict(SMALL)
    _, state = train_state.init_state(cfg)
    params = state.params
    grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)) * 3, params)
    lr, wd = 3e-3, 0.1
    ref_tx = optax.chain(optax.clip_by_global_norm(cfg.optim.grad_clip),
                         optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd,
                                     mask=train_state.decay_mask(params)))
    ref_state = ref_tx.init(params)
    tx = train_state.direction_transform(cfg)
    opt_state = tx.init(params)
    ours, ref = params, params
    for _ in range(3):
        d, opt_state = tx.update(grads, opt_state, ours)
        ours = train_state.apply_adamw(ours, d, lr, wd)
        u, ref_state = ref_tx.update(grads, ref_state, ref)
        ref = optax.apply_updates(ref, u)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_loss_falls_on_a_fixed_batch_and_metrics_follow_schedule():
    cfg, _, state, mesh, step = _setup()
    batch = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
    losses, lrs = [], []
    for _ in range(30):
        state, m = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(m["loss"]))
        lrs.append(float(m["lr"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0]
    assert lrs[0] == 0.0 and np.isclose(lrs[4], 1e-2)  # warm-up from 0, peak at the end of warm-up


def test_non_finite_update_is_dropped():
    cfg, graphdef, state, mesh, step = _setup()
    batch = sharding.global_batch(np.zeros((4, 17), np.int32), mesh)
    state, _ = step(state, batch)
    poisoned = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan)
                                                 if p.ndim == 1 else p, state.params))
    poisoned_host = jax.device_get(poisoned.params)
    new, m = step(poisoned, batch)
    assert int(m["skipped"]) == 1 and int(new.step) == 2
    for a, b in zip(jax.tree.leaves(jax.device_get(new.params)), jax.tree.leaves(poisoned_host)):
        np.testing.assert_array_equal(a, b)  # unchanged: the NaN came in, no update went out
