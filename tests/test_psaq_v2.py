"""PSAQ-ViT V2's pieces against independent computations (numpy KL, Adam's first step,
counted quantization levels); each test names the wrong variant it rules out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spdfq_jax import synth
from spdfq_jax.models import zoo
from spdfq_jax.quant import student as student_lib
from spdfq_jax.synth import layout as layout_lib
from spdfq_jax.synth import objective as objective_lib
from spdfq_jax.synth import psaq_v2


@pytest.fixture(scope="module")
def tiny():
  module = zoo.custom_vit(num_classes=10, img_size=16, patch_size=4, width=16, depth=2,
                          num_heads=2)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3)))
  student = student_lib.student(module, params["params"], 4, 4)
  return module, params["params"], x, student, student.init(x)


def _np_kl(p_logits, q_logits):
  """KL(softmax(p) || softmax(q)) per row, in float64 numpy."""
  def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp, lq = log_softmax(p_logits), log_softmax(q_logits)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _cfg(**kw):
  cfg = synth.default_config("psaq_v2")
  cfg.update(num_images=4, v2_w_bits=4, v2_a_bits=4, **kw)
  return cfg


def test_image_terms_drop_the_class_and_raise_the_students_disagreement(tiny):
  """Rules out: CE kept, the KL's sign or direction (KL(student || teacher)), the weight,
  the unjittered image, a padded image counted."""
  module, params, x, student, variables = tiny
  cfg = _cfg(v2_adversarial_weight=0.7)
  info = layout_lib.model_info(module, params, cfg)
  mask = np.array([1, 1, 1, 0], np.float32)
  fixed = {"mask": mask, "index": np.arange(4), "targets": np.eye(10)[:4],
           "region_targets": np.zeros((4, 4, 10)), "priors": []}
  row = {"step": np.int32(0), "lr": np.float32(0.1), "shift": np.int32(3),
         "flip": np.bool_(True), "region_shift": np.int32(0), "region_flip": np.bool_(False),
         "tv_target": np.float32(2700.0)}
  terms, _ = objective_lib.loss_terms(module, params, jnp.asarray(x), fixed, row, cfg, info, (),
                                      (student.apply, variables))
  assert set(terms) == {"entropy", "tv", "adversarial"}
  xa = np.flip(np.roll(x, (3, 3), axis=(1, 2)), 2)  # roll both axes by 3, then flip W
  t = np.asarray(module.apply({"params": params}, xa))
  s = np.asarray(student.apply(variables, xa))
  want = -0.7 * (_np_kl(t, s) * mask).sum() / 3
  np.testing.assert_allclose(float(terms["adversarial"]), want, rtol=1e-4)
  assert want < 0 and abs(want) > 1e-4  # the student disagrees, so the check has teeth


def test_student_step_is_one_adam_step_down_the_masked_kl(tiny):
  """Adam's first step moves every weight by lr * g / (|g| + eps): about lr against the
  sign of its gradient. Rules out: ascent, KL(student || teacher), the padded image in
  the loss, trained ranges."""
  module, params, x, student, variables = tiny
  cfg = _cfg(v2_student_lr=1e-3)
  state = psaq_v2.initial_state(student, cfg, x)
  mask = jnp.array([1.0, 1.0, 0.0, 1.0])
  teacher = module.apply({"params": params}, x)
  new, kd = jax.jit(lambda s: psaq_v2.student_step(student.apply, cfg, s, teacher, x, mask))(state)

  def own_loss(p):  # the masked mean of KL(teacher || student), written out again
    lt = jax.nn.log_softmax(teacher)
    ls = jax.nn.log_softmax(student.apply({**variables, "params": p}, x))
    return ((jnp.exp(lt) * (lt - ls)).sum(-1) * mask).sum() / 3
  grad = jax.grad(own_loss)(variables["params"])
  s = np.asarray(student.apply(variables, x))
  np.testing.assert_allclose(float(kd), (_np_kl(np.asarray(teacher), s) * mask).sum() / 3,
                             rtol=1e-4)
  moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                 new["variables"]["params"], variables["params"])
  checked = 0
  for d, g in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(grad)):
    g = np.asarray(g)
    big = np.abs(g) > 1e-5
    np.testing.assert_allclose(d[big], -1e-3 * np.sign(g[big]), rtol=1e-2)
    checked += big.sum()
  assert checked > 1000
  for frozen in ("quant", "wquant"):
    for a, b in zip(jax.tree_util.tree_leaves(new["variables"][frozen]),
                    jax.tree_util.tree_leaves(variables[frozen])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("w_bits", [3, 4])
def test_student_weights_take_at_most_2_to_the_bits_values_per_channel(tiny, w_bits):
  """Rules out: the row's weight bits ignored or swapped with the activation bits."""
  module, params, x, _, _ = tiny
  student = student_lib.student(module, params, w_bits, 8)
  variables = student.init(x)
  cfg = student_lib.student_config(w_bits, 8)
  from spdfq_jax.quant import weights  # pylint: disable=g-import-not-at-top
  kernel = np.asarray(weights.quantize_weights(variables["params"], variables["wquant"], cfg)
                      ["blocks_0"]["mlp"]["fc1"]["kernel"])
  levels = max(len(np.unique(kernel[:, c])) for c in range(kernel.shape[1]))
  assert 2 ** (w_bits - 1) < levels <= 2 ** w_bits


def _images(module, params, cfg, student=None):
  return synth.generate(module, params, cfg, progress=False, student=student).images


def test_only_the_adversarial_term_ties_the_images_to_the_student(tiny):
  """With weight 0 the images are those of PSAQ-ViT's loop without the class term (the
  student learns beside them but never reaches them); with weight 1 they move. Rules out
  the student reaching the images another way, and the weight being ignored. (Without the
  patch entropy, whose sharp KDE turns two programs' float rounding into 3e-3 in 4 steps.)"""
  module, params, _, student, _ = tiny
  kw = dict(iterations=4, warmup=1, v2_student_lr=1e-3, entropy=False)
  v1 = synth.default_config("psaq")
  v1.update(num_images=4, iterations=4, warmup=1, class_guidance=False, entropy=False)
  base = _images(module, params, v1)
  off = _images(module, params, _cfg(v2_adversarial_weight=0.0, **kw), student)
  on = _images(module, params, _cfg(**kw), student)
  np.testing.assert_allclose(off, base, atol=1e-6)
  assert np.abs(on - base).max() > 1e-3


def test_refusals():
  for kw, field in (({"v2_w_bits": 0}, "v2_w_bits"), ({"v2_a_bits": 9}, "v2_a_bits"),
                    ({"v2_student_lr": 0.0}, "v2_student_lr"),
                    ({"microbatches": 2}, "microbatches")):
    cfg = _cfg()
    cfg.update(**kw)
    with pytest.raises(ValueError, match=field):
      synth.check_config(cfg)
  with pytest.raises(ValueError, match="student"):
    psaq_v2.require(None)
