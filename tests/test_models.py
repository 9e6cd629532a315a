"""The Flax models against timm (stored fixtures, no torch), sizes, units and quant points."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from spdfq_jax import models
from spdfq_jax.models import convert, layers, taps, zoo
from parity_util import FIXTURES, attn_refs, fixture, rel_err

TOL = 1e-4


@pytest.fixture(scope="module", params=FIXTURES)
def loaded(request):
  module, path, ref = fixture(request.param)
  module, params = models.load(module, path)
  return request.param, module, params, ref


def test_logits_and_attention_match_timm(loaded):
  name, module, params, ref = loaded
  logits, attn, attn_v = taps.apply_with_attention(module, {"params": params}, ref["images"])
  assert rel_err(logits, ref["logits"]) <= TOL, name
  want = attn_refs(ref)
  assert len(attn) == len(want) == len(attn_v)
  for i, (a, b) in enumerate(zip(attn, want)):
    assert a.shape == b.shape, (name, i)
    np.testing.assert_allclose(a, b, atol=TOL, err_msg=f"{name} block {i}")


def test_units_compose_to_call(loaded):
  _, module, params, ref = loaded
  x = ref["images"]
  for unit, paths in zoo.units(module):
    assert all(p[0] in params for p in paths), unit
    x = module.apply({"params": params}, unit, x, method="run_unit")
  np.testing.assert_allclose(x, module.apply({"params": params}, ref["images"]), rtol=0, atol=1e-6)


class Recording(nn.Module):
  """An identity point that is not `layers.Point`: records where it sits."""
  kind: str = layers.ACT
  seen = []

  def __call__(self, x):
    Recording.seen.append((self.kind, "/".join(self.scope.path)))
    return x


def test_identity_points_leave_outputs_and_params_unchanged(loaded):
  name, module, params, ref = loaded
  Recording.seen = []
  recorded = zoo.with_point(module, Recording)
  out = recorded.apply({"params": params}, ref["images"])
  np.testing.assert_array_equal(out, module.apply({"params": params}, ref["images"]))
  assert convert.expected_shapes(recorded) == convert.expected_shapes(module)
  names = {path for _, path in Recording.seen}
  kinds = {kind for kind, _ in Recording.seen}
  assert kinds == {layers.ACT, layers.POST_LN, layers.SOFTMAX}
  block = "layers_0/blocks_0" if name == "swin" else "blocks_0"
  for point in ("qkv_in", "q", "k", "softmax", "v", "proj_in"):
    assert f"{block}/attn/{point}" in names
  assert {f"{block}/mlp/fc1_in", f"{block}/mlp/fc2_in", "patch_in", "head_in"} <= names
  if name == "swin":
    assert "layers_1/downsample/reduction_in" in names
  if name == "deit_distilled":
    assert "head_dist_in" in names


@pytest.mark.parametrize("name, count", [
    ("vit_base_patch16_224", 86_567_656),
    ("vit_small_patch16_224", 22_050_664),
    ("vit_tiny_patch16_224", 5_717_416),
    ("swin_tiny_patch4_window7_224", 28_288_354),
])
def test_parameter_counts(name, count):
  shapes = convert.expected_shapes(zoo.build(name))
  assert sum(int(np.prod(s)) for s in shapes.values()) == count


def test_num_classes_comes_from_the_head():
  module, path, _ = fixture("vit")
  module, params = models.load(module.clone(num_classes=1000), path)
  assert module.num_classes == 10
  assert jax.tree.leaves(params)  # loaded, and checked against the 10-class tree
