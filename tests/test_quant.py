"""Quantizers on hand-computed inputs, and the straight-through estimator's identity gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax import quant


def test_weight_gamma_is_mean_abs():
    w = jnp.array([[0.5, -1.5], [0.0, 2.0]])
    assert float(quant.weight_gamma(w)) == 1.0  # (0.5 + 1.5 + 0 + 2) / 4


def test_ternary_values_and_half_to_even_ties():
    # mean(|w|) = 10 / 10 = 1, so w / gamma = w: 0.5 rounds to 0 (even), 1.5 and 2.5 to 2 -> clip 1.
    w = jnp.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, 0.0, 0.49, 0.51])
    t, g = quant.ternary(w)
    assert float(g) == 1.0
    np.testing.assert_array_equal(np.asarray(t), [0, 0, 1, -1, 1, -1, 0, 0, 0, 1])
    # Scaling the tensor scales gamma, not the ternary pattern.
    np.testing.assert_allclose(np.asarray(quant.quantize_weight(w * 0.25)), np.asarray(t) * 0.25)


def test_weight_floor_keeps_zero_tensor_finite():
    w = jnp.zeros((3, 4))
    assert float(quant.weight_gamma(w)) == 1e-5 or np.isclose(float(quant.weight_gamma(w)), 1e-5)
    np.testing.assert_array_equal(np.asarray(quant.quantize_weight(w)), 0.0)
    tiny = jnp.full((2, 2), 1e-7)  # mean below the floor: gamma = 1e-5, 1e-7/1e-5 = 0.01 -> 0
    np.testing.assert_array_equal(np.asarray(quant.quantize_weight(tiny)), 0.0)


def test_activation_int8_per_token():
    x = jnp.array([[1.0, -0.5, 0.25, 0.0], [254.0, 1.0, -254.0, 127.0]])
    s = np.asarray(quant.activation_scale(x))
    np.testing.assert_allclose(s[:, 0], [127.0, 0.5])
    q = np.asarray(quant.quantize_activation(x))
    # row 0: x * 127 = [127, -63.5, 31.75, 0] -> round half-even [127, -64, 32, 0] / 127
    np.testing.assert_allclose(q[0], np.array([127, -64, 32, 0]) / 127.0, rtol=1e-7)
    # row 1: x * 0.5 = [127, 0.5, -127, 63.5] -> [127, 0, -127, 64] / 0.5
    np.testing.assert_allclose(q[1], [254.0, 0.0, -254.0, 128.0])


def test_activation_floor_and_clip():
    x = jnp.zeros((1, 3))
    np.testing.assert_array_equal(np.asarray(quant.quantize_activation(x)), 0.0)
    assert np.isclose(float(quant.activation_scale(x)[0, 0]), 127.0 / 1e-5)
    # The positive side never exceeds 127 levels: values stay within the absmax.
    x = jnp.array([[3.0, -3.0, 1.0]])
    q = np.asarray(quant.quantize_activation(x))
    assert q.max() <= 3.0 and q.min() >= -3.0


def test_ste_gradient_is_identity():
    w = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 7)) * 10
    cot_w = jax.random.normal(jax.random.PRNGKey(2), w.shape)
    cot_x = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    gw = jax.grad(lambda v: jnp.sum(quant.quantize_weight_ste(v) * cot_w))(w)
    gx = jax.grad(lambda v: jnp.sum(quant.quantize_activation_ste(v) * cot_x))(x)
    np.testing.assert_array_equal(np.asarray(gw), np.asarray(cot_w))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(cot_x))
    # Forward values are the quantized ones.
    np.testing.assert_allclose(np.asarray(quant.quantize_weight_ste(w)), np.asarray(quant.quantize_weight(w)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(quant.quantize_activation_ste(x)), np.asarray(quant.quantize_activation(x)), atol=1e-6)
