"""``model.matmul: int8``: the BitLinear product on the integer codes computes the float path's
function (logits, training losses), keeps its backward, multiplies s8 x s8 -> s32 in the HLO, and
checkpoints of either setting restore under the other."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax import checkpoint as ck
from bitnet_jax import resume as resume_lib
from bitnet_jax import sharding, train_state
from bitnet_jax.config import ConfigError, ModelConfig, from_dict
from bitnet_jax import model as model_lib
from bitnet_jax.model import BitNetLM, float_product, int8_product
from bitnet_jax.quant import activation_codes

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64, initializer_range=0.05)
SMALL = {"model": {**MODEL, "vocab_size": 300}, "train": {"steps": 40, "batch_size": 4, "seq_len": 32},
         "optim": {"warmup_steps": 4, "peak_lr_1": 1e-2, "peak_lr_2": 5e-3},
         "tokenizer": {"builtin_vocab_size": 300}, "checkpoint": {"every": 5, "async_save": False}}


def _int8_hlo():
    if "int8_hlo" not in sys.modules:  # a benchmarks/ script, not a package module
        spec = importlib.util.spec_from_file_location("int8_hlo", REPO / "benchmarks/int8_hlo.py")
        sys.modules["int8_hlo"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["int8_hlo"])
    return sys.modules["int8_hlo"]


def _forward(cfg: ModelConfig, seed: int = 3):
    model = BitNetLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)), params


def _logits_and_codes(cfg: ModelConfig, tokens, monkeypatch, seed: int = 3):
    """Eager forward pass; also returns every BitLinear input's int8 codes, in call order."""
    codes = []

    def recording(product):
        def wrapped(x, w, dtype):
            codes.append(np.asarray(activation_codes(x)[0]))
            return product(x, w, dtype)
        return wrapped

    for kind in ("float", "int8"):
        monkeypatch.setitem(model_lib.PRODUCTS, kind, recording(model_lib.PRODUCTS[kind]))
    logits = np.asarray(BitNetLM(cfg, rngs=nnx.Rngs(seed))(tokens))
    monkeypatch.undo()
    return logits, codes


@pytest.mark.parametrize("act,kv_heads", [("relu2", 2), ("silu", None)])
def test_int8_logits_equal_the_float32_path(act, kv_heads, monkeypatch):
    """Both products compute sum_i (q_i / s)(t_ij gamma): the int8 one sums the integers exactly and
    rescales once, the float32 one rounds each product and partial sum (about 1e-7 relative each).
    Where every activation code agrees, the logits agree to float32 rounding, far below 1e-5 of their
    scale. A value within that rounding of a code boundary rounds to a neighbouring code (a BitNet
    rounding flip); causal attention carries a flip at position t only to positions t and later, so
    each sequence is compared up to its first flipped position."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (4, 24)), jnp.int32)
    cfg = ModelConfig(**{**MODEL, "hidden_act": act, "num_key_value_heads": kv_heads})
    ours, codes = _logits_and_codes(cfg, tokens, monkeypatch)
    int8, codes8 = _logits_and_codes(cfg.model_copy(update={"matmul": "int8"}), tokens, monkeypatch)
    assert len(codes) == len(codes8) == 7 * cfg.num_hidden_layers
    flipped_BxT = np.any([np.any(a != b, axis=-1) for a, b in zip(codes, codes8)], axis=0)
    first_flip = np.where(flipped_BxT.any(-1), flipped_BxT.argmax(-1), tokens.shape[1])
    compared = [(b, t) for b in range(tokens.shape[0]) for t in range(first_flip[b])]
    assert len(compared) >= tokens.size // 2  # flips are rare: most positions are compared
    rows = tuple(np.array(compared).T)
    scale = np.abs(ours).max()
    diff = np.abs(int8[rows] - ours[rows]).max()
    assert 0 < diff < 1e-5 * scale  # not the same code path, the same function


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_backward_is_the_float_paths(dtype):
    """Straight-through gradients in the compute dtype: the float path's backward, the same operations
    (the activation gradient bit for bit)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)), dtype)
    w = jnp.asarray(0.05 * rng.standard_normal((64, 48)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 48)), dtype)
    grads = {}
    for name, product in (("float", float_product), ("int8", int8_product)):
        y, vjp = jax.vjp(lambda x, w: product(x, w, dtype), x, w)
        assert y.dtype == dtype
        grads[name] = jax.jit(vjp)(g)
    (dx_f, dw_f), (dx_i, dw_i) = grads["float"], grads["int8"]
    assert dx_i.dtype == dtype and dw_i.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dx_i, np.float32), np.asarray(dx_f, np.float32))
    # The weight gradient sums over the 15 tokens; XLA may order that sum differently when the same
    # operations are compiled beside a different forward pass: float32 rounding, ~1e-7 relative.
    dw_f = np.asarray(dw_f)
    np.testing.assert_allclose(np.asarray(dw_i), dw_f, rtol=0, atol=1e-6 * np.abs(dw_f).max())


def _losses(cfg, steps: int, state=None, nudge_seed: int | None = None) -> tuple[list[float], object]:
    """Losses of ``steps`` train steps from a fresh (or the given) state over four fixed batches.
    ``nudge_seed``: after every update, move each weight one ulp up or down at random."""
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, fresh = train_state.init_state(cfg)
    state, shardings = train_state.place_state(state or fresh, mesh)
    step = train_state.make_train_step(cfg, graphdef, mesh, shardings)
    batches = np.random.default_rng(2).integers(0, cfg.model.vocab_size, (4, 4, 33)).astype(np.int32)
    rng = None if nudge_seed is None else np.random.default_rng(nudge_seed)
    out = []
    for i in range(steps):
        state, m = step(state, sharding.global_batch(batches[i % len(batches)], mesh))
        out.append(float(m["loss"]))
        if rng is not None:
            host = jax.device_get(state)
            up = lambda p: np.nextafter(p, np.where(rng.random(p.shape) < 0.5, -np.inf, np.inf).astype(p.dtype))
            state = jax.device_put(host.replace(params=jax.tree.map(up, host.params)), shardings)
    return out, state


def test_twenty_int8_training_steps_follow_the_float_path():
    """Step by step from the same state, the int8 loss is the float path's to float rounding and a
    few rounding flips (each moves one token's loss by up to ~1e-2, so the mean of 128 by ~1e-4).
    Run freely, both trajectories carry their tiny difference on, and BitNet's rounding plus Adam
    amplify it, as they amplify any: the float path whose weights get a one-ulp nudge after every
    update moves as far (3e-3 to 1e-2 relative by step 20 here, above the 1e-3 issue 12 asked for).
    The int8 path must stay within twice that chaos floor, measured in the same test."""
    float_cfg = from_dict(SMALL)
    int8_cfg = from_dict({**SMALL, "model": {**SMALL["model"], "matmul": "int8"}})
    ref, ref_state = _losses(float_cfg, 20)
    got, _ = _losses(int8_cfg, 20)
    assert ref[-1] < 0.8 * ref[0]  # it learns
    assert got != ref  # a different product, not the float path again
    ref = np.array(ref)
    # From one state (the float run's last), one step each: the same forward pass up to rounding.
    host = jax.device_get(ref_state)
    same_state = [_losses(c, 1, jax.tree.map(jnp.asarray, host))[0][0] for c in (float_cfg, int8_cfg)]
    assert abs(same_state[1] - same_state[0]) < 1e-4 * same_state[0]
    chaos = np.array([_losses(float_cfg, 20, nudge_seed=seed)[0] for seed in (100, 101)])
    chaos_rel = np.abs(chaos - ref) / ref
    rel = np.abs(np.array(got) - ref) / ref
    assert chaos_rel.max() > 0  # the nudges did move the trajectory: the floor is real
    assert rel.max() < 2 * chaos_rel.max(), (rel, chaos_rel.max(axis=0))


def test_the_hlo_multiplies_s8_codes_into_s32():
    """Every BitLinear forward product of the jitted forward is an s8 x s8 -> s32 dot, in the lowered
    module and after XLA CPU's optimisation; the float path has none."""
    int8_hlo = _int8_hlo()
    tokens = jnp.zeros((2, 16), jnp.int32)
    cfg = ModelConfig(**MODEL)
    projections = 7 * cfg.num_hidden_layers
    for matmul in ("int8", "float"):
        forward, params = _forward(cfg.model_copy(update={"matmul": matmul}))
        lowered = forward.lower(params, tokens)
        for text in (lowered.as_text(dialect="hlo", debug_info=True), lowered.compile().as_text()):
            products = [m for m in int8_hlo.find_matmuls(text) if m.forward_bitlinear]
            assert len(products) == projections
            s8 = [m for m in products if m.operands == ["s8", "s8"] and m.result == "s32"]
            assert len(s8) == (projections if matmul == "int8" else 0)
            verdict = int8_hlo.verdict(products)
            assert verdict.startswith(f"{projections} of {projections}" if matmul == "int8" else "not int8")


def test_int8_hlo_reads_gpu_style_gemms():
    """The verdicts for the GPU's forms of a product, on hand-written HLO lines of each form."""
    int8_hlo = _int8_hlo()
    meta = 'metadata={op_name="jit(train_step)/jvp(bitlinear_matmul)/dot_general"}'
    cublas = f"""
ENTRY %main (a: s8[64,32], b: s8[32,16]) -> s32[64,16] {{
  %a = s8[64,32]{{1,0}} parameter(0)
  %b = s8[32,16]{{1,0}} parameter(1)
  %custom-call.1 = (s32[64,16]{{1,0}}, s8[1024]{{0}}) custom-call(%a, %b), custom_call_target="__cublas$gemm", {meta}
}}"""
    triton = f"""
%gemm_fusion_dot.1_computation (p0: s8[64,32], p1: s8[32,16]) -> s32[64,16] {{
  %p0 = s8[64,32]{{1,0}} parameter(0)
  %p1 = s8[32,16]{{1,0}} parameter(1)
  ROOT %dot.1 = s32[64,16]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}, {meta}
}}
ENTRY %main (a: s8[64,32], b: s8[32,16]) -> s32[64,16] {{
  %a = s8[64,32]{{1,0}} parameter(0)
  %b = s8[32,16]{{1,0}} parameter(1)
  ROOT %fusion.1 = s32[64,16]{{1,0}} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.1_computation, {meta}, backend_config={{"fusion_backend_config":{{"kind":"__triton_gemm"}}}}
}}"""
    upcast = cublas.replace("s8[64,32]{1,0} parameter(0)", "f32[64,32]{1,0} parameter(0)").replace(
        "s8[32,16]{1,0} parameter(1)", "f32[32,16]{1,0} parameter(1)")
    assert "cuBLAS int8 GEMM (__cublas$gemm) x1" in int8_hlo.verdict(int8_hlo.find_matmuls(cublas))
    assert "Triton int8 fusion (__triton_gemm) x1" in int8_hlo.verdict(int8_hlo.find_matmuls(triton))
    assert int8_hlo.verdict(int8_hlo.find_matmuls(upcast)).startswith("not int8: none of the 1 ")


def test_int8_needs_the_bitnet_quantization():
    with pytest.raises(ConfigError, match="model.matmul 'int8' multiplies BitNet's integer codes"):
        from_dict({**SMALL, "model": {**SMALL["model"], "matmul": "int8", "quantization": "none"}})


@pytest.mark.parametrize("saved,resumed", [("float", "int8"), ("int8", "float")])
def test_a_checkpoint_of_one_matmul_setting_resumes_under_the_other(tmp_path, capsys, saved, resumed):
    """model.matmul is a compute choice (like model.attention): --resume with the other value restores
    the same state, says it is not bit for bit, and the next step's loss is the saved setting's up to
    rounding and a few flips (the same-state bound of the test above)."""
    cfg = from_dict({**SMALL, "model": {**SMALL["model"], "matmul": saved}})
    _, state = _losses(cfg, 3)
    mngr = ck.CheckpointManager(tmp_path, cfg)
    mngr.save(3, state, data_state={"position": 3})
    mngr.close()
    host_state = jax.device_get(state)

    cfg2, plan = resume_lib.plan(resume_lib.parse_target(str(tmp_path), str(tmp_path.parent), None), None, [f"model.matmul={resumed}"], None)
    assert cfg2.model.matmul == resumed and plan.step == 3
    assert "model.matmul differ" in capsys.readouterr().err
    mesh = sharding.make_mesh(cfg2.mesh)
    _, restored, _, _ = resume_lib.initial_state(cfg2, mesh, plan)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(restored)),
                                                     jax.tree.leaves(host_state)))
    there, _ = _losses(cfg2, 1, restored)
    here, _ = _losses(cfg, 1, jax.tree.map(jnp.asarray, host_state))
    np.testing.assert_allclose(there, here, rtol=1e-4)
