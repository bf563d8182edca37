"""BitNet metrics agree with direct numpy computations on a real model: ternary fractions, gamma,
latent RMS, the captured activation absmax, and flip rates between two measurements."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.bitnet_metrics import BitNetMetrics
from bitnet_jax.config import ModelConfig
from bitnet_jax.model import BitNetLM

MODEL = ModelConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=32)
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def measured():
    model = BitNetLM(MODEL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, MODEL.vocab_size, (3, 9)), jnp.int32)
    bm = BitNetMetrics(graphdef, tokens)
    first = bm(params)
    # Flip the sign of layer 0's q_proj: every nonzero ternary weight changes (-1 <-> +1).
    q = params["layers"][0]["self_attn"]["q_proj"]["weight"]
    q.set_value(-q.get_value())
    second = bm(params)
    return model, params, tokens, first, second


def ternary_np(w):
    gamma = max(np.abs(w).mean(), 1e-5)
    return np.clip(np.round(w / gamma), -1, 1), gamma


def test_every_layer_and_projection_has_every_stat(measured):
    _, _, _, first, second = measured
    stats = ("frac_neg", "frac_zero", "frac_pos", "gamma", "latent_rms", "act_absmax_mean", "act_absmax_max")
    for layer in range(MODEL.num_hidden_layers):
        for proj in PROJECTIONS:
            for stat in stats:
                assert f"bitnet/layers.{layer}.{proj}/{stat}" in first
            assert f"bitnet/layers.{layer}.{proj}/flip_rate" in second
    assert not any(k.endswith("flip_rate") for k in first)  # no previous pattern at the first measurement
    for key in ("frac_neg", "frac_zero", "frac_pos", "latent_rms", "gamma_mean", "act_absmax_max"):
        assert f"bitnet/model/{key}" in first
    assert len(second) == len(first) + MODEL.num_hidden_layers * len(PROJECTIONS) + 1


def test_weight_stats_match_numpy(measured):
    _, params, _, first, _ = measured
    # layer 1's down_proj is untouched between the measurements; compare the first one with numpy
    w = np.asarray(params["layers"][1]["mlp"]["down_proj"]["weight"].get_value())
    t, gamma = ternary_np(w)
    tag = "bitnet/layers.1.mlp.down_proj"
    assert first[f"{tag}/frac_neg"] == pytest.approx((t == -1).mean(), abs=1e-6)
    assert first[f"{tag}/frac_zero"] == pytest.approx((t == 0).mean(), abs=1e-6)
    assert first[f"{tag}/frac_pos"] == pytest.approx((t == 1).mean(), abs=1e-6)
    assert first[f"{tag}/gamma"] == pytest.approx(gamma, rel=1e-5)
    assert first[f"{tag}/latent_rms"] == pytest.approx(np.sqrt((w ** 2).mean()), rel=1e-5)
    assert sum(first[f"bitnet/model/frac_{k}"] for k in ("neg", "zero", "pos")) == pytest.approx(1.0, abs=1e-6)


def test_activation_absmax_is_the_bitlinear_input(measured):
    model, _, tokens, first, _ = measured
    # q/k/v of layer 0 read input_layernorm(embedding(tokens)), the model's first BitLinear input.
    x = model.layers[0].input_layernorm(jnp.take(model.embed_tokens[...], tokens[:, :-1], axis=0))
    absmax = np.abs(np.asarray(x)).max(axis=-1)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert first[f"bitnet/layers.0.self_attn.{proj}/act_absmax_mean"] == pytest.approx(absmax.mean(), rel=1e-5)
        assert first[f"bitnet/layers.0.self_attn.{proj}/act_absmax_max"] == pytest.approx(absmax.max(), rel=1e-5)


def test_flip_rate_counts_changed_ternary_weights(measured):
    _, params, _, _, second = measured
    q = np.asarray(params["layers"][0]["self_attn"]["q_proj"]["weight"].get_value())
    t, _ = ternary_np(q)
    assert second["bitnet/layers.0.self_attn.q_proj/flip_rate"] == pytest.approx((t != 0).mean(), abs=1e-6)
    assert second["bitnet/layers.0.self_attn.k_proj/flip_rate"] == 0.0
    n_q = q.size
    n_all = MODEL.num_hidden_layers * sum(
        np.asarray(params["layers"][0][a][b]["weight"].get_value()).size
        for a, b in (p.split(".") for p in PROJECTIONS))
    assert second["bitnet/model/flip_rate"] == pytest.approx((t != 0).sum() / n_all, rel=1e-5)
    assert n_q < n_all
