"""Quantizers against closed-form references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax.quant import quantizers as Q


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, "4", True, None])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match="2..8"):
    Q.check_bits(bits)
  with pytest.raises(ValueError):
    Q.fake_quant(jnp.ones(3), 1.0, 0.0, bits)


def test_hand_computed_asymmetric_grid():
  # [-1, 2] at 2 bits: scale 1, zero 1, grid {-1, 0, 1, 2}.
  s, z = Q.scale_zero(-1.0, 2.0, 2)
  assert float(s) == 1.0 and float(z) == 1.0
  x = jnp.array([-3.0, -1.0, -0.4, 0.6, 1.49, 2.0, 7.0])
  np.testing.assert_array_equal(Q.fake_quant(x, s, z, 2), [-1, -1, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(Q.to_int(x, s, z, 2), [0, 0, 1, 2, 2, 3, 3])


def test_hand_computed_symmetric_grid():
  # amax 3 at 3 bits: scale 1, grid -4..3.
  s, z = Q.scale_zero(-2.0, 3.0, 3, symmetric=True)
  assert float(s) == 1.0 and float(z) == 0.0
  x = jnp.array([-9.0, -2.6, 0.2, 2.5, 9.0])
  np.testing.assert_array_equal(Q.fake_quant(x, s, z, 3, True), [-4, -3, 0, 2, 3])


def test_range_includes_zero():
  s, z = Q.scale_zero(1.0, 5.0, 8)  # [1, 5] -> [0, 5]
  np.testing.assert_allclose(s, 5 / 255, rtol=1e-6)
  assert float(z) == 0.0
  assert float(Q.fake_quant(jnp.float32(0.0), s, z, 8)) == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_bound(bits, symmetric):
  x = jax.random.normal(jax.random.PRNGKey(bits), (64, 16)) * jnp.linspace(0.1, 5, 16)
  for gran in ("tensor", "channel"):
    s, z = Q.quantize_tensor(x, bits=bits, granularity=gran)
    lo, hi = Q.minmax_range(x, Q.reduce_axes(2, gran))
    err = jnp.abs(x - Q.fake_quant(x, s, z, bits, symmetric))
    if symmetric:  # symmetric grid from the asymmetric range is not the point here
      s, z = Q.scale_zero(lo, hi, bits, True)
      err = jnp.abs(x - Q.fake_quant(x, s, z, bits, True))
      inside = jnp.abs(x) <= jnp.maximum(-lo, hi) * (2 ** (bits - 1) - 1) / 2 ** (bits - 1)
      assert bool(jnp.all(jnp.where(inside, err <= s / 2 + 1e-6, True)))
    else:
      assert bool(jnp.all(err <= s / 2 + 1e-6))


def test_per_token_dynamic_bound():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 10, 32)) * jnp.arange(1, 11)[:, None]
  y = Q.dynamic_fake_quant(x, 4)
  lo, hi = jnp.minimum(x.min(-1, keepdims=True), 0), jnp.maximum(x.max(-1, keepdims=True), 0)
  assert bool(jnp.all(jnp.abs(x - y) <= (hi - lo) / 15 / 2 + 1e-6))


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_zero_range_no_nan(method):
  for c in (0.0, 3.0, -2.0):
    x = jnp.full((8, 4), c)
    s, z = Q.quantize_tensor(x, bits=4, granularity="channel", method=method)
    y = Q.fake_quant(x, s, z, 4)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y, x, atol=1e-6)
  x = jnp.zeros((2, 4, 4))
  assert bool(jnp.all(Q.log2_quant(x, 1.0, 4) == 0))
  assert bool(jnp.all(jnp.isfinite(Q.dynamic_fake_quant(x, 4))))
  s, z = Q.shift_log2_params(jnp.float32(0), jnp.float32(0), 0.01, 4)
  assert bool(jnp.all(jnp.isfinite(Q.shift_log2_quant(x, s, z, 0.01, 4))))


def test_ste_gradient():
  """Identity where the rounded code is strictly inside the grid; zero where it is clipped
  and at the first and last code (I&S-ViT's torch.clamp with scalar bounds)."""
  s, z = Q.scale_zero(-1.0, 2.0, 2)  # representable range [-1, 2], codes 0..3, zero 1
  x = jnp.array([-3.0, -0.9, 0.3, 1.2, 1.7, 2.4])  # codes -2, 0, 1, 2, 3, 3
  g = jax.grad(lambda v: jnp.sum(Q.fake_quant(v, s, z, 2)))(x)
  np.testing.assert_array_equal(g, [0, 0, 1, 1, 0, 0])
  g = jax.grad(lambda v: jnp.sum(Q.dynamic_fake_quant(v, 4)))(x[None])
  assert bool(jnp.all(jnp.isfinite(g)))


def test_percentile_and_mse_clip_outliers():
  x = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(0), (10000,)), jnp.array([100.0])])
  s_mm, _ = Q.quantize_tensor(x, bits=4, granularity="tensor", method="minmax")
  for method in ("percentile", "mse"):
    s, z = Q.quantize_tensor(x, bits=4, granularity="tensor", method=method, pct=99.9)
    assert float(s) < float(s_mm) / 2
  # MSE never does worse than min/max on the data it searched
  lo, hi = Q.mse_range(x, (0,), 4)
  e_mse = Q.quant_error(x, (0,), lo, hi, 4)
  e_mm = Q.quant_error(x, (0,), *Q.minmax_range(x, (0,)), 4)
  assert float(e_mse) <= float(e_mm)


def test_log2_levels_and_gradient():
  x = jnp.array([1.0, 0.5, 0.3, 0.26, 0.24, 2.0 ** -20, 0.0])
  y = Q.log2_quant(x, 1.0, 2)  # levels 1, 1/2, 1/4, 1/8; below -> 0
  np.testing.assert_allclose(y, [1.0, 0.5, 0.25, 0.25, 0.25, 0.0, 0.0])
  g = jax.grad(lambda v: jnp.sum(Q.log2_quant(v, 1.0, 2)))(x)
  np.testing.assert_array_equal(g, [1, 1, 1, 1, 1, 0, 0])


def test_shift_log2_grid():
  # t = -log2(x + shift) on [0, 1]; reconstructions lie on 2^-t_k - shift.
  x = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (4, 50)) * 3, axis=-1)
  shift = 2.0 ** -6
  s, z = Q.shift_log2_params(x.min(), x.max(), shift, 4)
  y = Q.shift_log2_quant(x, s, z, shift, 4)
  t = -jnp.log2(y + shift)
  k = t / s + z
  np.testing.assert_allclose(k, jnp.round(k), atol=1e-3)
  assert float(jnp.abs(x - y).max()) < 0.1
  g = jax.grad(lambda v: jnp.sum(Q.shift_log2_quant(v, s, z, shift, 4)))(x)
  assert bool(jnp.all(g == 1))
