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
from bitnet_jax.model import _attention_xla, compute_dtype_matmul, tied_head

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_matmul_value_and_gradients_equal_autodiff_with_compute_dtype_operands(dtype):
    """compute_dtype_matmul (every BitLinear and dense-twin product) gives autodiff's values and
    gradients: in float32 it is autodiff's own expression (bit for bit, so float32 runs are what they
    were); in bf16 widening to float32 is exact and both accumulate in float32, so only summation
    order may differ. Its backward multiplies compute-dtype operands, autodiff's float32 x bf16."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 16)), dtype)
    w = jnp.asarray(0.1 * rng.standard_normal((16, 24)), dtype)
    g = jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32)

    def ours(x, w):
        return jnp.sum(compute_dtype_matmul(x, w).astype(jnp.float32) * g)

    def plain(x, w):
        return jnp.sum(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype).astype(jnp.float32) * g)

    (v1, (dx1, dw1)), (v2, (dx2, dw2)) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w) for f in (ours, plain))
    assert float(v1) == float(v2)  # the same forward expression
    tol = 0.0 if dtype == jnp.float32 else 2 ** -8  # float32: the same ops; bf16: summation order, then one rounding
    for a, b in ((dx1, dx2), (dw1, dw2)):
        assert a.dtype == b.dtype == dtype
        b = np.asarray(b, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0, atol=tol * np.abs(b).max())
    dots = [e for e in _all_eqns(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, w).jaxpr)
            if e.primitive.name == "dot_general"]
    assert len(dots) == 3  # the forward product and the backward's two
    assert all(v.aval.dtype == dtype for e in dots for v in e.invars)
    plain_dots = [e for e in _all_eqns(jax.make_jaxpr(jax.grad(plain, argnums=(0, 1)))(x, w).jaxpr)
                  if e.primitive.name == "dot_general"]
    mixed = any(len({v.aval.dtype for v in e.invars}) > 1 for e in plain_dots)  # float32 x bf16
    assert mixed == (dtype == jnp.bfloat16)


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


def _benchmark_module(name: str):
    """A benchmarks/ script as a module (it puts benchmarks/ on sys.path for its own imports)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.slow
def test_bench_train_compares_with_transformers_and_the_dense_twin_on_the_same_weights_and_batches(tmp_path):
    out = tmp_path / "bench.json"
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--config", "configs/tiny.yaml", *sets,
                           "--steps", "2", "--warmup", "1", "--compare-hf", "--compare-dense", "--profile",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours, dense, theirs = result["rows"]
    assert ours["name"] == "bitnet-jax BitNet (matmul float, attention auto)"
    assert dense["name"] == "bitnet-jax dense twin (attention auto)" and theirs["name"].startswith("transformers")
    assert ours["steps"] == dense["steps"] == theirs["steps"] == 2
    # Same weights, same first batch: the same loss (to float32 noise) before any update.
    assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-4 * abs(theirs["first_loss"])
    assert dense["first_loss"] != ours["first_loss"]  # the same weights, unquantized
    ratios = result["ratios"]
    assert ratios["bitnet_vs_dense"] == ours["tokens_per_s"] / dense["tokens_per_s"]
    assert ratios["bitnet_vs_transformers_eager"] == result["speedup_vs_transformers"] > 0
    assert "lm_head (fwd)" in result["profile_ms"]  # the named scopes reach the profile
    assert sum(result["breakdown_ms"].values()) == pytest.approx(sum(result["profile_ms"].values()))
    assert "bitnet-jax BitNet / bitnet-jax dense twin tokens/s" in proc.stdout
    assert "bitnet-jax / transformers tokens/s" in proc.stdout


def test_ratios_pair_the_best_row_of_each_side_and_the_breakdown_keeps_every_millisecond():
    bench = _benchmark_module("bench_train")

    def row(name, tps, **tags):
        return bench.Result(name, 1e3 / tps, tps, 1.0, 5.0, tags=tags)

    rows = [row("float xla", 100.0, framework="bitnet-jax", model="bitnet", matmul="float"),
            row("float cudnn", 150.0, framework="bitnet-jax", model="bitnet", matmul="float"),
            row("int8", 120.0, framework="bitnet-jax", model="bitnet", matmul="int8"),
            row("dense", 160.0, framework="bitnet-jax", model="dense", matmul="float"),
            row("eager", 50.0, framework="transformers", model="bitnet", torch_compile=False),
            row("compiled", 75.0, framework="transformers", model="bitnet", torch_compile=True),
            row("float cudnn before", 200.0, framework="bitnet-jax", model="bitnet", matmul="float",
                matmul_backward="autodiff")]
    assert bench.ratios(rows) == {"bitnet_vs_transformers_eager": 150.0 / 50.0,
                                  "bitnet_vs_transformers_compile": 150.0 / 75.0,
                                  "bitnet_vs_dense": 150.0 / 160.0, "int8_vs_dense": 120.0 / 160.0,
                                  "compute_dtype_matmul_gain": 150.0 / 200.0}  # "before" rows only there
    assert bench.ratios(rows[:1]) == {}
    cats = {"bitlinear_matmul (fwd)": 3.0, "lm_head (bwd)": 2.0, "act_quant (fwd)": 1.5, "rope (bwd)": 0.25,
            "optimizer": 0.5, "other (fwd)": 0.125}
    parts = bench.breakdown(cats)
    assert parts["matmuls"] == 5.0 and parts["quantizers"] == 1.5 and parts["other"] == 0.375
    assert sum(parts.values()) == sum(cats.values())
    assert bench._category("") == "other"  # a kernel without metadata is no optimizer time


@pytest.mark.slow
def test_gpu_bench_script_runs_every_row_and_writes_the_results_file_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RESULTS_DIR": str(tmp_path / "results"),
           "CONFIG": "configs/tiny.yaml", "SETS": " ".join(TINY_SETS), "STEPS": "2", "WARMUP": "1",
           "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    for knob in ("BEST_ATTENTION", "TORCH_COMPILE", "BUDGET", "HF", "PROFILE"):
        env.pop(knob, None)
    proc = subprocess.run(["bash", "benchmarks/gpu_bench.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "devices " in proc.stdout and ("(no nvidia-smi)" in proc.stdout or "NVIDIA-SMI" in proc.stdout)
    (kept_file,) = (tmp_path / "results").glob("gpu-*.json")
    kept = json.loads(kept_file.read_text())
    assert kept_file.name == f"gpu-cpu-{kept['date']}.json"  # no nvidia-smi: the JAX device kind
    assert (tmp_path / "out" / kept_file.name).read_text() == kept_file.read_text()
    assert kept["device"] == "cpu" and kept["jax"] == jax.__version__ and kept["config"] == "tiny"
    rows = {r["name"]: r for r in kept["rows"]}
    float_row = rows["bitnet-jax BitNet (matmul float, attention xla)"]
    int8_row = rows["bitnet-jax BitNet (matmul int8, attention xla)"]
    dense_row = rows["bitnet-jax dense twin (attention xla)"]
    (hf_name,) = [n for n in rows if n.startswith("transformers BitNet")]  # no torch.compile row on CPU
    for r in rows.values():
        assert {"name", "tokens_per_sec", "step_ms", "mfu", "peak_mem_gib"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["step_ms"] > 0
    assert abs(rows[hf_name]["first_loss"] - float_row["first_loss"]) < 1e-4 * float_row["first_loss"]
    assert abs(int8_row["first_loss"] - float_row["first_loss"]) < 1e-5 * float_row["first_loss"]
    assert float_row["estimate_mem_gib"] > 0 and float_row["xla_mem_gib"] > 0
    assert kept["ratios"]["int8_vs_dense"] == int8_row["tokens_per_sec"] / dense_row["tokens_per_sec"]
    assert set(kept["ratios"]) == {"bitnet_vs_transformers_eager", "bitnet_vs_dense", "int8_vs_dense",
                                   "compute_dtype_matmul_gain"}
    before = rows["bitnet-jax BitNet (matmul float, attention xla, autodiff matmul backward)"]
    assert kept["ratios"]["compute_dtype_matmul_gain"] == float_row["tokens_per_sec"] / before["tokens_per_sec"]
    assert abs(before["first_loss"] - float_row["first_loss"]) < 1e-6 * float_row["first_loss"]  # same forward
    assert set(kept["breakdown_ms"]) == {"matmuls", "attention", "quantizers", "norms", "loss", "optimizer", "other"}
    assert kept["breakdown_ms"]["matmuls"] > 0 and kept["profiled"] == float_row["name"]
    assert "BitLinear forward products" in kept["int8_dot"] == int8_row["int8_dot"]
    assert "BitLinear forward products" in (tmp_path / "out" / "int8_hlo.txt").read_text()
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "60,000 steps" in table and "estimate (dry run)" in table and "bitnet-jax dense twin" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [kept_file.name, "gpu_bench.log", "gpu_bench.md", "int8_hlo.txt"])  # what comes back from a device


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
