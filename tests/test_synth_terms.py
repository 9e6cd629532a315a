"""SPDFQ's terms pinned against independent computations (numpy, closed forms, hand counts).

Each test names the wrong variant it rules out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax import synth
from spdfq_jax.models import taps, zoo
from spdfq_jax.synth import losses, regions
from spdfq_jax.synth import draws as draws_lib
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import objective as objective_lib
from spdfq_jax.synth import step as step_lib


def _tiny_vit(depth=4, prefix_distilled=False):
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=depth,
                          num_heads=2, distilled=prefix_distilled)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  return module, params["params"]


def _no_jitter_row(tv_target=0.0):
  return {"step": np.int32(0), "lr": np.float32(0.1), "shift": np.int32(0),
          "flip": np.bool_(False), "region_shift": np.int32(0), "region_flip": np.bool_(False),
          "tv_target": np.float32(tv_target)}


@pytest.mark.parametrize("depth,blocks,weights", [
    (4, (1, 2, 3), (2 / 4, 3 / 4, 4 / 4)),   # 1-based l >= 2: l = 2, 3, 4; weight l / L
    (5, (2, 3, 4), (3 / 5, 4 / 5, 5 / 5)),   # l >= 2.5: l = 3, 4, 5
])
def test_apa_loss_end_to_end_selects_deep_half_with_depth_weights(depth, blocks, weights):
  """Rules out: weight l/L with 0-based l, blocks l > L/2 or all blocks, a wrong row."""
  module, params = _tiny_vit(depth)
  cfg = synth.default_config("spdfq")
  cfg.update(num_images=3, msr=False, sl=False, tv_weight=0.0, alpha1=7.0)
  info = layout_lib.model_info(module, params, cfg)
  assert layout_lib.apa_block_indices(info, cfg) == blocks
  pri = draws_lib.draw_priors(module, params, cfg, info, blocks, None)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 16, 16, 3))
  fixed = {"mask": jnp.ones(3), "index": jnp.arange(3), "targets": jnp.eye(10)[:3],
           "region_targets": jnp.zeros((3, 4, 10)), "priors": [jnp.asarray(p) for p in pri]}
  terms, _ = objective_lib.loss_terms(module, params, x, fixed, _no_jitter_row(), cfg, info,
                                      layout_lib.apa_block_indices(info, cfg))
  _, attns, _ = taps.apply_with_attention(module, {"params": params}, x)
  expected = 0.0
  for l, w, p in zip(blocks, weights, pri):
    row = np.asarray(attns[l])[:, :, 0, 1:]  # CLS query, patch keys
    row = row / row.sum(-1, keepdims=True)
    expected += w * ((row - p) ** 2).mean(-1).sum(-1)  # mean over tokens, sum over heads
  np.testing.assert_allclose(terms["apa"], 7.0 * expected.mean(), rtol=1e-5)


def test_apa_all_blocks_unweighted_variant():
  module, params = _tiny_vit(4)
  cfg = synth.default_config("spdfq")
  cfg.update(apa_blocks="all", depth_weight=False)
  info = layout_lib.model_info(module, params, cfg)
  assert layout_lib.apa_block_indices(info, cfg) == (0, 1, 2, 3)
  assert losses.depth_weights((0, 1, 2, 3), 4, cfg.depth_weight) == [1.0] * 4


def test_swin_window_maps_average_over_queries():
  """Every query of window w attends to key k_w only: the map must be one-hot at k_w.
  Averaging over keys instead would give the constant 1/N."""
  b, nw, h, n = 2, 3, 2, 4
  keys = np.array([[0, 3, 1], [2, 2, 0]])  # (b, nw)
  attn = np.zeros((b * nw, h, n, n), np.float32)
  for i in range(b):
    for w in range(nw):
      attn[i * nw + w, :, :, keys[i, w]] = 1.0  # image-major window order, as Swin's partition
  got = np.asarray(losses.window_attention(jnp.asarray(attn), b))
  assert got.shape == (b, nw, h, n)
  for i in range(b):
    for w in range(nw):
      np.testing.assert_array_equal(got[i, w], np.eye(n)[[keys[i, w]] * h])
  prior = np.full((b, h, n), 0.25, np.float32)
  loss = losses.apa_loss([jnp.asarray(attn)], [jnp.asarray(prior)], [0], [1.0], 0, True)
  # per window and head: ((1 - 0.25)^2 + 3 * 0.25^2) / 4 = 0.1875; mean over windows, sum heads
  np.testing.assert_allclose(loss, [h * 0.1875] * b, rtol=1e-6)


@pytest.mark.parametrize("sl", [True, False])
def test_draw_labels_exact_soft_targets_of_each_own_class(sl):
  """Replays the documented draw order (per image: class, z, 4 region classes, 4 z's) and
  checks the closed form e^z / (e^z + C - 1). Rules out: regions built from the image's
  class, the whole target from a region's class, a wrong z."""
  cfg = synth.default_config("spdfq")
  cfg.update(num_images=6, seed=11, sl=sl)
  info = layout_lib.ModelInfo(False, 1, 4, (2,) * 4, (4,) * 4, 10, (16, 16, 3))
  got = draws_lib.draw_labels(cfg, info)
  c = 10
  for i in range(6):
    g = np.random.default_rng([11, 2, i])
    cls, z = g.integers(0, c), g.uniform(5, 10)
    rcls, rz = g.integers(0, c, 4), g.uniform(5, 10, 4)
    assert got["classes"][i] == cls
    np.testing.assert_array_equal(got["region_classes"][i], rcls)
    for target, k, zk in [(got["targets"][i], cls, z)] + [
        (got["region_targets"][i, r], rcls[r], rz[r]) for r in range(4)]:
      want = np.full(c, 1 / (np.exp(zk) + c - 1))
      want[k] = np.exp(zk) / (np.exp(zk) + c - 1)
      if not sl:
        want = np.eye(c)[k]
      np.testing.assert_allclose(target, want, rtol=2e-5, atol=1e-7)


def test_whole_target_with_region_classes_variant():
  cfg = synth.default_config("spdfq")
  cfg.update(num_images=1, seed=3, whole_target_has_regions=True)
  info = layout_lib.ModelInfo(False, 1, 4, (2,) * 4, (4,) * 4, 10, (16, 16, 3))
  got = draws_lib.draw_labels(cfg, info)["targets"][0]
  g = np.random.default_rng([3, 2, 0])
  cls, z, rcls, rz = g.integers(0, 10), g.uniform(5, 10), g.integers(0, 10, 4), g.uniform(5, 10, 4)
  logits = np.zeros(10)
  logits[cls] += z
  np.add.at(logits, rcls, rz)
  np.testing.assert_allclose(got, np.exp(logits) / np.exp(logits).sum(), rtol=2e-5, atol=1e-7)


def _bilinear_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Half-pixel-centre bilinear resize of (h, w, c), edges clamped (an independent oracle)."""
  h, w = img.shape[:2]

  def taps_1d(n_out, n_in):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo

  y0, y1, fy = taps_1d(out_h, h)
  x0, x1, fx = taps_1d(out_w, w)
  top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
  bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


@pytest.mark.parametrize("shape", [(16, 16), (14, 10)])
def test_msr_regions_are_quadrants_bilinearly_resized(shape):
  """Rules out nearest-neighbour resizing, a wrong quadrant order, a transposed crop."""
  h, w = shape
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  got = np.asarray(regions.all_regions(jnp.asarray(x), 2))
  quads = [(slice(0, h // 2), slice(0, w // 2)), (slice(0, h // 2), slice(w // 2, w)),
           (slice(h // 2, h), slice(0, w // 2)), (slice(h // 2, h), slice(w // 2, w))]
  for i in range(2):
    for r, (ys, xs) in enumerate(quads):
      np.testing.assert_allclose(got[i, r], _bilinear_numpy(x[i, ys, xs], h, w), atol=1e-5)


def test_start_is_unclamped_noise_unless_clamp_init():
  """PSAQ-ViT starts from plain N(0, 1) and clips only after a step."""
  cfg = synth.default_config("psaq")
  cfg.update(num_images=4)
  info = layout_lib.ModelInfo(False, 1, 4, (2,) * 4, (4,) * 4, 10, (16, 16, 3))
  lo, hi = layout_lib.pixel_range(cfg, 3)
  x = draws_lib.initial_images(cfg, info)
  assert (x < lo).any() and (x > hi).any()
  assert 0.9 < x.std() < 1.1
  cfg.clamp_init = True
  np.testing.assert_array_equal(draws_lib.initial_images(cfg, info), np.clip(x, lo, hi))


def test_prior_fit_is_pearson_of_renormalised_cls_rows():
  """1 when the CLS row (renormalised over patches) is the prior; numpy's corrcoef against
  another prior. Rules out an uncentred cosine, a wrong row, no renormalisation."""
  b, h, prefix, g = 2, 3, 1, 9
  n = prefix + g
  rng = np.random.default_rng(0)
  prior = rng.dirichlet(np.ones(g), (b, h)).astype(np.float32)
  other = rng.dirichlet(np.ones(g), (b, h)).astype(np.float32)
  attn = rng.dirichlet(np.ones(n), (b, h, n)).astype(np.float32)
  attn[:, :, 0, prefix:] = prior * (1 - attn[:, :, 0, :prefix].sum(-1, keepdims=True))
  fit = losses.prior_fit([jnp.asarray(attn)], [jnp.asarray(prior)], [0], prefix, False)[0]
  np.testing.assert_allclose(fit, 1.0, rtol=1e-5)
  fit = losses.prior_fit([jnp.asarray(attn)], [jnp.asarray(other)], [0], prefix, False)[0]
  want = [[np.corrcoef(prior[i, j], other[i, j])[0, 1] for j in range(h)] for i in range(b)]
  np.testing.assert_allclose(fit, want, rtol=1e-4, atol=1e-6)


def _pixel_oracle(prior: np.ndarray, grid: int, patch: int, shift: int, flip: bool
                  ) -> np.ndarray:
  """A prior moved as the image is: painted onto the pixels (each cell a patch), rolled and
  flipped by the image jitter itself (`augment`), then read back as one value per patch."""
  lead = prior.shape[:-1]
  cells = prior.reshape(-1, grid, grid)
  pixels = np.repeat(np.repeat(cells, patch, 1), patch, 2)[..., None]  # (N, S, S, 1)
  moved = np.asarray(objective_lib.augment(jnp.asarray(pixels), jnp.int32(shift), jnp.bool_(flip)))
  back = moved[..., 0].reshape(-1, grid, patch, grid, patch).mean((2, 4))
  return back.reshape(lead + (grid * grid,))


@pytest.mark.parametrize("shift,whole,flip", [
    (4, 4, False), (-8, -8, True), (5, 4, True),  # 5 px = 1.25 cells -> 1 cell
    (-7, -8, False),  # -1.75 cells -> -2 cells
])
def test_priors_follow_the_jitter_of_the_image(shift, whole, flip):
  """`apa_follows_jitter`: the priors cover the same pixels after the step's roll and flip
  as before, to the nearest patch; and the APA term uses them. Rules out a roll by pixels
  instead of cells, a roll of one axis only, a flip of the height, a missing flip, and APA
  still reading the unmoved priors."""
  module, params = _tiny_vit(4)  # 16 x 16 px, 4 px patches: a 4 x 4 grid
  cfg = synth.default_config("spdfq")
  cfg.update(num_images=3, msr=False, sl=False, tv_weight=0.0, alpha1=5.0,
             apa_follows_jitter=True)
  info = layout_lib.model_info(module, params, cfg)
  blocks = layout_lib.apa_block_indices(info, cfg)
  pri = draws_lib.draw_priors(module, params, cfg, info, blocks, None)
  moved = objective_lib.jitter_priors([jnp.asarray(p) for p in pri], jnp.int32(shift),
                                      jnp.bool_(flip), info, blocks)
  for p, m in zip(pri, moved):
    want = _pixel_oracle(p, 4, 4, whole, flip)
    np.testing.assert_allclose(m, want, rtol=1e-6)
    assert not np.allclose(want, p)  # the case moves the prior

  x = jax.random.normal(jax.random.PRNGKey(3), (3, 16, 16, 3))
  fixed = {"mask": jnp.ones(3), "index": jnp.arange(3), "targets": jnp.eye(10)[:3],
           "region_targets": jnp.zeros((3, 4, 10)), "priors": [jnp.asarray(p) for p in pri]}
  row = dict(_no_jitter_row(), shift=np.int32(shift), flip=np.bool_(flip))
  terms, _ = objective_lib.loss_terms(module, params, x, fixed, row, cfg, info, blocks)
  _, attns, _ = taps.apply_with_attention(module, {"params": params},
                                          objective_lib.augment(x, shift, flip))
  expected = 0.0
  for l, p in zip(blocks, pri):
    got = np.asarray(attns[l])[:, :, 0, 1:]
    got = got / got.sum(-1, keepdims=True)
    expected += (l + 1) / 4 * ((got - _pixel_oracle(p, 4, 4, whole, flip)) ** 2).mean(-1).sum(-1)
  np.testing.assert_allclose(terms["apa"], 5.0 * expected.mean(), rtol=1e-5)


def test_priors_follow_jitter_is_off_by_default_and_refused_for_swin():
  """Off by default, and absent from a run's identity while off (earlier cached runs keep
  theirs); a Swin run that asks for it fails before any step, naming the field."""
  cfg = synth.default_config("spdfq")
  assert cfg.apa_follows_jitter is False
  assert "apa_follows_jitter" not in synth.config.identity(cfg)
  cfg.apa_follows_jitter = True
  assert synth.config.identity(cfg)["apa_follows_jitter"] is True
  module = zoo.custom_swin(num_classes=10, img_size=16, patch_size=2, embed_dim=8,
                           depths=(2, 2), num_heads=(2, 2), window_size=4)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))["params"]
  info = layout_lib.model_info(module, params, cfg)
  with pytest.raises(ValueError, match="apa_follows_jitter"):
    step_lib.make_step(module, cfg, info, layout_lib.apa_block_indices(info, cfg), None)
