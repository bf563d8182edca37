"""The performance paths keep the numerics: the tied head's custom gradient, the attention layout the
cuDNN path relies on, bf16 compute with float32 master weights, per-backend compiler options, and
the benchmark scripts (run on CPU with tiny configs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import compile_options, sharding, train_state
from bitnet_jax.config import from_dict
from bitnet_jax.model import _attention_xla, tied_head

REPO = Path(__file__).resolve().parents[1]
SMALL = {"model": {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 32},
         "train": {"steps": 10, "batch_size": 4, "seq_len": 32}, "optim": {"warmup_steps": 2}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_head_value_and_gradients_equal_autodiff(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 16)), dtype)
    embed = jnp.asarray(0.1 * rng.standard_normal((40, 16)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 8, 40)), jnp.float32)

    def ours(x, e):
        return jnp.sum(tied_head(x, e.astype(dtype)) * g)

    def plain(x, e):
        return jnp.sum(jnp.dot(x, e.astype(dtype).T, preferred_element_type=jnp.float32) * g)

    (v1, (dx1, de1)), (v2, (dx2, de2)) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, embed)
                                          for f in (ours, plain))
    assert dx1.dtype == dx2.dtype == dtype and de1.dtype == de2.dtype == jnp.float32
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: ours also rounds the logits' cotangent to bf16
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    for ours_grad, plain_grad in ((dx1, dx2), (de1, de2)):
        plain_grad = np.asarray(plain_grad, np.float32)
        np.testing.assert_allclose(np.asarray(ours_grad, np.float32), plain_grad, rtol=0,
                                   atol=tol * np.abs(plain_grad).max())
    # Every matmul of ours, forward and backward, multiplies operands of the compute dtype: no
    # float32 x bf16 product that XLA would run as a float32 matmul.
    jaxpr = jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, embed)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3
    assert all(v.aval.dtype == dtype for e in dots for v in e.invars)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


@pytest.mark.parametrize("t, s", [(16, 16), (5, 12)])  # training (causal) and a decoding chunk
def test_xla_attention_has_the_layout_grouping_and_gradients_of_jax_dot_product_attention(t, s):
    """``[B, T, N, H]`` inputs, grouped K/V heads and the ``[B, T, S]`` mask mean the same as in
    ``jax.nn.dot_product_attention`` (which the cuDNN path calls), values and gradients: our stacked
    group layout and late softmax normalisation change summation order, not the model."""
    rng = np.random.default_rng(1)
    b, n, kv, h = 2, 6, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))
    cot = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    positions = (s - t) + jnp.arange(t)
    mask_BxTxS = jnp.broadcast_to(jnp.arange(s)[None, :] <= positions[:, None], (b, t, s))

    def ours(q, k, v):
        return jnp.sum(_attention_xla(q, k, v, mask_BxTxS) * cot)

    def ref(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=mask_BxTxS[:, None], implementation="xla")
        return jnp.sum(out * cot)

    got, want = jax.value_and_grad(ours, (0, 1, 2))(q, k, v), jax.value_and_grad(ref, (0, 1, 2))(q, k, v)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_master_weights_and_the_loss():
    batch = np.random.default_rng(2).integers(0, 256, (4, 33)).astype(np.int32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = from_dict({**SMALL, "model": {**SMALL["model"], "compute_dtype": dtype, "attention": "xla"}})
        mesh = sharding.make_mesh(cfg.mesh)
        graphdef, state = train_state.init_state(cfg)
        state, shardings = train_state.place_state(state, mesh)
        step = train_state.make_train_step(cfg, graphdef, mesh, shardings)
        out = []
        for _ in range(3):
            state, m = step(state, sharding.global_batch(batch, mesh))
            out.append(float(m["loss"]))
        losses[dtype] = out
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_compiler_options_only_on_cpu_and_never_over_the_users_xla_flags(monkeypatch):
    assert compile_options.for_backend("gpu") == {}
    assert compile_options.for_backend("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert compile_options.for_backend("cpu") == compile_options.CPU_OPTIONS  # this jaxlib accepts them
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert compile_options.for_backend("cpu") == {}


# --------------------------------------------------------------------------- the benchmark scripts on CPU

TINY_SETS = ["model.hidden_size=64", "model.num_attention_heads=4", "train.batch_size=4", "train.seq_len=32"]


@pytest.mark.slow
def test_bench_train_compares_with_transformers_on_the_same_weights_and_batches(tmp_path):
    out = tmp_path / "bench.json"
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--config", "configs/tiny.yaml", *sets,
                           "--steps", "2", "--warmup", "1", "--compare-hf", "--profile", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours, theirs = result["rows"]
    assert ours["name"].startswith("bitnet-jax") and theirs["name"].startswith("transformers")
    assert ours["steps"] == theirs["steps"] == 2
    # Same weights, same first batch: the same loss (to float32 noise) before any update.
    assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-4 * abs(theirs["first_loss"])
    assert result["speedup_vs_transformers"] > 0
    assert "lm_head (fwd)" in result["profile_ms"]  # the named scopes reach the profile
    assert "bitnet-jax / transformers tokens/s" in proc.stdout


@pytest.mark.slow
def test_gpu_bench_script_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CONFIG": "configs/tiny.yaml", "SETS": " ".join(TINY_SETS),
           "STEPS": "2", "WARMUP": "1", "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    env.pop("ATTENTION", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_bench.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "devices " in proc.stdout and ("(no nvidia-smi)" in proc.stdout or "NVIDIA-SMI" in proc.stdout)
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "bitnet-jax (attention xla)" in table and "60,000 steps" in table
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["first_loss"] > 0


@pytest.mark.parametrize("overrides", [{}, {"model": {"num_key_value_heads": 4}}, {"model": {"num_key_value_heads": 1}}])
def test_matmul_floor_lists_every_matmul_of_the_step(overrides):
    """The floor's list of products adds up to the step's FLOPs (6 N + 12 L d T, whose 6 N also
    counts the norm weights, a few parameters that are no matmul): nothing is left out or doubled."""
    import importlib.util

    from bitnet_jax.model import flops_per_token

    spec = importlib.util.spec_from_file_location("floor", REPO / "benchmarks/bench_matmul_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    data = {k: dict(v) for k, v in SMALL.items()}
    for section, values in overrides.items():
        data[section].update(values)
    cfg = from_dict(data)
    m, t = cfg.model, cfg.train
    tokens = t.batch_size * t.seq_len
    listed = sum(2 * b * mm * k * n * count for _, count, (b, mm, k, n) in floor.step_matmuls(cfg))
    norm_params = m.num_hidden_layers * (3 * m.hidden_size + m.intermediate_size) + m.hidden_size
    assert listed == (flops_per_token(cfg.model, t.seq_len) - 6 * norm_params) * tokens
