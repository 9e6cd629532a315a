"""The chance level of the prior fit for real-attention priors (`prior='real'`): the fit of
each image's attention to another image's prior, the previous one (np.roll by 1 over the
images), recomputed here with np.corrcoef.

The correlation is symmetric, so over all images the previous and the next image's prior
give the same mean (the same pairs); a pairing two images apart, another head or the
image's own prior give other numbers."""
import jax
import numpy as np
import pytest

from spdfq_jax import synth
from spdfq_jax.models import taps, zoo
from spdfq_jax.synth import diagnostics, layout
from spdfq_jax.synth.result import SynthResult

N = 5


def _fit(rows, priors):
  """Mean over images and heads of the Pearson correlation of rows (n, H, G) with priors."""
  n, h, _ = rows.shape
  return float(np.mean([[np.corrcoef(rows[i, j], priors[i, j])[0, 1] for j in range(h)]
                        for i in range(n)]))


def test_real_prior_chance_is_the_previous_images_prior():
  """Images whose priors are their own attention (a real-attention prior taken on the
  images themselves): prior fit 1, chance the fit to image i - 1's prior (image n - 1 for
  image 0), per block and overall."""
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=4,
                          num_heads=2)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(  # attention far from uniform
      lambda v: np.asarray(v) + 0.5 * rng.randn(*v.shape).astype(np.float32), params["params"])
  images = rng.randn(N, 16, 16, 3).astype(np.float32)
  cfg = synth.default_config("spdfq")
  cfg.update(prior="real", num_images=N)
  info = layout.model_info(module, params, cfg)
  blocks = layout.apa_block_indices(info, cfg)
  assert len(blocks) >= 2 and info.prefix == 1
  _, attns, _ = jax.jit(lambda p, x: taps.apply_with_attention(module, {"params": p}, x))(
      params, images)
  rows = []
  for l in blocks:  # the CLS row over the patch tokens, renormalised to sum one
    r = np.asarray(attns[l], np.float64)[:, :, 0, 1:]
    rows.append(r / r.sum(-1, keepdims=True))
  priors = [r.astype(np.float32) for r in rows]
  result = SynthResult(images, np.zeros(N, np.int32), np.eye(10, dtype=np.float32)[[0] * N],
                       priors=priors, apa_blocks=blocks)

  d = diagnostics.diagnostics(module, params, cfg, info, result)

  assert d["prior_fit"] == pytest.approx(1.0, abs=1e-5)
  previous = [_fit(r, r[(np.arange(N) - 1) % N]) for r in rows]
  np.testing.assert_allclose(d["prior_fit_chance"], np.mean(previous), atol=1e-5)
  for got, r in zip(d["prior_fit_chance_per_block"], rows):
    want = [[np.corrcoef(r[i, j], r[(i - 1) % N, j])[0, 1] for j in range(r.shape[1])]
            for i in range(N)]
    np.testing.assert_allclose(got, np.mean(want, 0), atol=1e-4)
  # Not vacuous: the other pairings are told apart.
  two_apart = np.mean([_fit(r, r[(np.arange(N) - 2) % N]) for r in rows])
  other_head = np.mean([_fit(r, r[:, ::-1]) for r in rows])
  for alternative in (two_apart, other_head, 1.0):
    assert abs(np.mean(previous) - alternative) > 1e-2, (previous, alternative)
