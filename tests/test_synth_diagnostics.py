"""A run's diagnostics (synth/diagnostics.py) against an independent recount on its images."""
import jax
import numpy as np
import pytest

from spdfq_jax import synth
from spdfq_jax.models import taps, zoo
from spdfq_jax.synth import priors


def _tiny_vit(depth=4, prefix_distilled=False):
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=depth,
                          num_heads=2, distilled=prefix_distilled)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  return module, params["params"]


def test_run_diagnostics_measure_class_and_prior_fit():
  """The recorded fit of a run equals an independent recount on its images."""
  module, params = _tiny_vit(4)
  cfg = synth.default_config("inversion")
  cfg.update(num_images=3, iterations=20, warmup=2, tv_weight=0.0)
  res = synth.generate(module, params, cfg, progress=False)
  logits, attns, _ = taps.apply_with_attention(module, {"params": params}, res.images)
  d = res.diagnostics
  hits = np.argmax(logits, -1) == res.classes
  assert 0 < hits.mean() and d["class_fit"] == pytest.approx(hits.mean())
  per_block = []
  for l, p in zip(res.apa_blocks, res.priors):
    row = np.asarray(attns[l])[:, :, 0, 1:]
    per_block.append([[np.corrcoef(row[i, j], p[i, j])[0, 1] for j in range(2)]
                      for i in range(3)])
  np.testing.assert_allclose(d["prior_fit"], np.mean(per_block), atol=1e-4)
  assert len(d["prior_fit_per_block"]) == len(res.apa_blocks) == 3
  # Chance: the same images against fresh mixtures (those of images 3..5 of the seed).
  fresh = priors.draw_priors(cfg.seed, np.arange(3, 6), [(2, 4)] * 3, cfg.k_apa,
                             tuple(cfg.sigma_range))
  chance = [[[np.corrcoef(np.asarray(attns[l])[i, j, 0, 1:], p[i, j])[0, 1] for j in range(2)]
             for i in range(3)] for l, p in zip(res.apa_blocks, fresh)]
  np.testing.assert_allclose(d["prior_fit_chance"], np.mean(chance), atol=1e-4)
