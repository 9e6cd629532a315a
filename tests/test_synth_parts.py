"""Priors, losses and MSR regions on small arrays (no model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax.synth import losses, priors, regions


@pytest.mark.parametrize("kind", ["gmm", "laplace"])
def test_priors_are_distributions_and_differ_per_head(kind):
  out = priors.draw_priors(0, np.arange(3), [(2, 4), (3, 5)], 5, (1.0, 3.0), kind)
  assert [p.shape for p in out] == [(3, 2, 16), (3, 3, 25)]
  for p in out:
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert (p >= 0).all()
  assert not np.allclose(out[0][:, 0], out[0][:, 1])


def test_priors_depend_on_image_index_not_position():
  a = priors.draw_priors(0, np.array([0, 1, 2]), [(2, 4)], 5, (1., 3.))[0]
  b = priors.draw_priors(0, np.array([2, 0]), [(2, 4)], 5, (1., 3.))[0]
  np.testing.assert_array_equal(a[[2, 0]], b)
  assert not np.allclose(a, priors.draw_priors(1, np.arange(3), [(2, 4)], 5, (1., 3.))[0])


def test_single_component_prior_peaks_at_its_mean():
  p = priors.mixture_map(np.random.default_rng(0), 7, 1, (1.0, 1.0))
  g = p.reshape(7, 7)
  iy, ix = np.unravel_index(g.argmax(), g.shape)
  assert g[iy, ix] > 2 * np.median(g)


def test_soft_targets_and_ce():
  t = losses.soft_targets(jnp.array([1]), 4, jnp.array([5.0]))
  np.testing.assert_allclose(t[0, 1], np.exp(5) / (np.exp(5) + 3), rtol=1e-6)
  logits = jnp.array([[0.0, 2.0, 0.0, 0.0]])
  ref = -(t * jax.nn.log_softmax(logits)).sum()
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, t)[0], ref, rtol=1e-6)


def test_apa_is_zero_on_its_prior_and_weights_depth():
  b, h, prefix, g = 2, 3, 2, 9
  n = prefix + g
  prior = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (b, h, g)), -1)
  attn = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (b, h, n, n)), -1)
  row = attn[:, :, 0, :prefix].sum(-1, keepdims=True)
  attn = attn.at[:, :, 0, prefix:].set(prior * (1 - row))  # CLS row = prior after renorm.
  loss = jax.jit(lambda a, p: losses.apa_loss([a, a], [p, p * 0], [0, 1], [0.5, 1.0], prefix,
                                              False))(attn, prior)
  np.testing.assert_allclose(loss, (prior ** 2).mean(-1).sum(-1), rtol=1e-5)


def _entropy_reference(values, bw=0.01, points=10):
  out = []
  for v in np.asarray(values, np.float64):
    xs = np.linspace(v.min(), v.max(), points)
    pdf = np.exp(-0.5 * ((xs[:, None] - v[None]) / bw) ** 2).mean(1) / (bw * np.sqrt(2 * np.pi))
    p = pdf + 1e-4
    f = -p * np.log(p)
    out.append(((f[1:] + f[:-1]) / 2 * np.diff(xs)).sum())
  return np.array(out)


def test_kde_entropy_matches_reference():
  v = jax.random.uniform(jax.random.PRNGKey(0), (3, 50), minval=-0.2, maxval=0.3)
  np.testing.assert_allclose(losses.kde_entropy(v), _entropy_reference(v), rtol=1e-4)


def test_patch_entropy_drops_prefix_and_has_gradient():
  av = jax.random.normal(jax.random.PRNGKey(0), (2, 1 + 9, 8))
  sims = losses.patch_similarity(av, 2, 1)
  assert sims.shape == (2, 9, 9)
  np.testing.assert_allclose(jnp.diagonal(sims, axis1=1, axis2=2), 1.0, rtol=1e-5)
  g = jax.jit(jax.grad(lambda a: losses.patch_entropy_loss([a], [2], 1, 2).sum()))(av)
  assert np.isfinite(g).all() and np.abs(g[:, 1:]).sum() > 0
  np.testing.assert_allclose(g[:, 0], 0.0)


@pytest.mark.parametrize("windows", [1, 4])
def test_patch_entropy_over_upper_triangle_equals_full_matrix(windows):
  # The loss reads each symmetric similarity matrix once (upper triangle, doubled weights);
  # it must equal the KDE entropy over all P x P entries (per image, pooled over windows).
  b, p = 3, 9
  av = jax.random.normal(jax.random.PRNGKey(1), (b * windows, 1 + p, 8))
  full = np.asarray(losses.patch_similarity(av, 2, 1)).reshape(b, -1)
  got = losses.patch_entropy_loss([av], [2], 1, b)
  np.testing.assert_allclose(got, -_entropy_reference(full), rtol=1e-4)


def test_tv_matches_psaq_form():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 7, 2))
  xt = np.asarray(x)
  d = [xt[:, :, :-1] - xt[:, :, 1:], xt[:, :-1] - xt[:, 1:], xt[:, 1:, :-1] - xt[:, :-1, 1:],
       xt[:, :-1, :-1] - xt[:, 1:, 1:]]
  ref = sum(np.linalg.norm(v) for v in d)
  np.testing.assert_allclose(losses.tv_batch(x, jnp.ones(3)), ref, rtol=1e-5)
  masked = losses.tv_batch(jnp.concatenate([x, 100 * x]), jnp.array([1., 1, 1, 0, 0, 0]))
  np.testing.assert_allclose(masked, ref, rtol=1e-5)
  assert losses.tv_target_scale(32, (224, 224, 3)) == pytest.approx(1.0)


def test_region_gradient_stays_inside_region():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 12, 3))
  slices = regions.region_slices(16, 12, 2)
  for k, (ys, xs) in enumerate(slices):
    g = jax.jit(jax.grad(lambda x, k=k: (regions.all_regions(x, 2)[:, k] ** 2).sum()))(x)
    inside = np.zeros(x.shape, bool)
    inside[:, ys, xs] = True
    assert np.abs(g[~inside]).max() == 0.0
    assert np.abs(g[inside]).min() > 0.0
  assert regions.all_regions(x, 2).shape == (2, 4, 16, 12, 3)


def test_region_selection_counts():
  count = jax.jit(lambda k, kmax: jax.vmap(lambda k: regions.select_regions(k, 4, kmax))(
      jax.random.split(k, 400)).sum(-1), static_argnums=1)
  m = np.asarray(count(jax.random.PRNGKey(0), 4))
  assert set(np.unique(m)) == {1, 2, 3, 4}
  assert set(np.unique(np.asarray(count(jax.random.PRNGKey(1), 2)))) == {1, 2}
