"""Any checkpoint from the command line: architecture specs, architectures read from a
checkpoint's shapes, timm files of unregistered shapes through `main`, the convert tool."""
import functools
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from spdfq_jax import main, models
from spdfq_jax.models import arch, layouts, native, zoo
from spdfq_jax.quant import config as quant_config
from spdfq_jax.synth import config as synth_config
from spdfq_jax.tools import convert as convert_tool
from parity_util import fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shape of the example: outside the registry, grey-scale.
SHAPE = dict(img_size=32, patch_size=4, width=64, depth=8, num_heads=4, num_classes=10)
SPEC = "vit:img_size=32,patch_size=4,width=64,depth=8,num_heads=4"


@functools.lru_cache(None)
def _custom():
  module = zoo.custom_vit(**SHAPE)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))
  return module, params["params"]


@pytest.fixture
def timm_file(tmp_path):
  path = str(tmp_path / "vit_c1.safetensors")
  save_file(layouts.vit_to_timm(_custom()[1]), path)
  return path


# ----------------------------------------------------------------------------- specs


def test_specs():
  assert arch.parse(SPEC) == ("vit", {k: v for k, v in SHAPE.items() if k != "num_classes"})
  assert arch.parse("deit:distilled=true") == ("vit", {"distilled": True})
  family, kw = arch.parse("swin:img_size=64,depths=[2,2],num_heads=(2,4),window_size=4")
  assert family == "swin" and kw["depths"] == (2, 2) and kw["num_heads"] == (2, 4)
  family, kw = arch.parse("deit_small_patch16_224:img_size=384")
  assert kw == dict(zoo.entry("deit_small_patch16_224").kwargs, img_size=384)
  assert arch.module_spec(zoo.custom_vit(**SHAPE)) == (
      "vit:num_classes=10,img_size=32,patch_size=4,width=64,depth=8,num_heads=4")
  for bad, match in (("vit:heads=4", "did you mean num_heads"), ("vit:width=abc", "like 768"),
                     ("resnet:depth=50", "neither a family"), ("vit:depth", "not key=value")):
    with pytest.raises(ValueError, match=match):
      arch.parse(bad)


def test_sizes_that_do_not_divide():
  with pytest.raises(ValueError, match="img_size 30 is not a multiple of patch_size 4"):
    arch.build("vit", dict(SHAPE, img_size=30))
  with pytest.raises(ValueError, match="width 64 is not a multiple of num_heads 3"):
    arch.build("vit", dict(SHAPE, num_heads=3))
  with pytest.raises(ValueError, match="img_size / patch_size must be divisible by 4"):
    arch.build("swin", dict(img_size=24, patch_size=4, embed_dim=8, depths=(1, 1, 1),
                            num_heads=(1, 2, 4), window_size=2))


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "swin"])
def test_architecture_read_from_timm_shapes(name):
  """The parity fixtures are timm files: their shapes give all but ViT heads / Swin size."""
  module, path, _ = fixture(name)
  missing = "img_size" if name == "swin" else "num_heads"
  with pytest.raises(ValueError, match=f"{missing} cannot be read from the checkpoint's shapes"):
    models.load(None, path)
  given = getattr(module, missing)
  loaded, _ = models.load(f"{'swin' if name == 'swin' else 'vit'}:{missing}={given}", path)
  assert native.describe(loaded) == native.describe(module)


def test_swin_input_size_read_where_a_window_shrinks():
  """Stage windows larger than the map shrink to it: then the table gives the input size."""
  module = zoo.custom_swin(img_size=32, patch_size=2, embed_dim=8, depths=(1, 1, 1),
                           num_heads=(1, 2, 2), window_size=8, num_classes=3)
  shapes = {k: v.shape for k, v in flax.traverse_util.flatten_dict(jax.eval_shape(
      module.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))["params"], sep="/").items()}
  family, kw, missing = arch.infer(shapes)
  assert (family, missing, kw["img_size"], kw["window_size"]) == ("swin", [], 32, 8)


def test_augreg_npz_gives_the_heads(tmp_path):
  from test_convert import to_vit_jax  # pylint: disable=g-import-not-at-top
  module, path, _ = fixture("vit")
  _, params = models.load(module, path)
  npz = str(tmp_path / "augreg.npz")
  np.savez(npz, **to_vit_jax(params))
  loaded, _ = models.load(None, npz)  # nothing given: every field from the file
  assert native.describe(loaded) == native.describe(module)


# ----------------------------------------------------------------------------- main


def _quantize(module, params, images, cfg, workdir=None):
  apply = jax.jit(module.apply)

  class Q:
    timings = {}
    variables = {"params": params}

    def logits(self, x):
      return apply({"params": params}, x)
  return Q()


def _generate(module, params, cfg, workdir=None):
  class R:
    images = np.random.default_rng(0).normal(size=(cfg.num_images, 32, 32, 1)).astype(np.float32)
    diagnostics = {}
  return R


def _run(tmp_path, **model):
  from configs import fmnist_w4a4  # pylint: disable=g-import-not-at-top
  c = fmnist_w4a4.get_config()
  c.unlock()
  c.num_images, c.eval.limit, c.eval.batch_size, c.export = 2, 16, 16, False
  for k, v in model.items():
    c.model[k] = v
  stages = main.Stages(models.load, synth_config.default_config, _generate,
                       quant_config.default_config, _quantize, None)
  return main.run(c, str(tmp_path / "work"), stages)


needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    reason="needs the Fashion-MNIST IDX files")


@needs_fmnist
def test_timm_file_of_any_shape_through_main(tmp_path, timm_file):
  for name in ("", "fmnist_vit"):  # no name, or the demo config's (a built-in asset)
    with pytest.raises(main.InputError, match=r"num_heads cannot be read.*num_heads=\?"):
      _run(tmp_path, name=name, checkpoint=timm_file)
  out = _run(tmp_path, name="", checkpoint=timm_file, arch="vit:num_heads=4")
  assert out["model"] == "vit_c1" and out["num_images"] == 2 and out["eval_count"] == 16
  assert out["quant_top1"] == out["fp_top1"]  # the stand-in quantizer is the FP model


@needs_fmnist
def test_converted_file_runs_by_path_alone(tmp_path, timm_file):
  dst = str(tmp_path / "ours.safetensors")
  summary = convert_tool.convert(timm_file, dst, arch="vit:num_heads=4")
  assert summary.endswith(arch.module_spec(zoo.custom_vit(**SHAPE)))
  module, params = models.load(None, dst)
  want = _custom()[1]
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params,
                                                       flax.core.unfreeze(want)))
  # An empty name, or the demo config's own (a built-in asset), with only the path.
  for name in ("", "fmnist_vit"):
    out = _run(tmp_path / name, name=name, checkpoint=dst)
    assert out["model"] == "ours"
  with pytest.raises(FileExistsError, match="exists: choose another path, or pass --overwrite"):
    convert_tool.convert(timm_file, dst, arch="vit:num_heads=4")
  convert_tool.convert(timm_file, dst, arch="vit:num_heads=4", overwrite=True)


def test_convert_stores_preprocessing(tmp_path):
  _, path, _ = fixture("vit")
  dst = str(tmp_path / "v.safetensors")
  convert_tool.convert(path, dst, arch="vit:num_heads=3",
                       pre="crop_pct=1.0,mean=[0.5,0.5,0.5],std=[0.5,0.5,0.5],input_size=32")
  assert native.read_metadata(dst)["preprocessing"]["crop_pct"] == 1.0
  assert convert_tool.preprocessing(None, "deit_tiny_patch16_224") == zoo.entry(
      "deit_tiny_patch16_224").preprocessing
  with pytest.raises(ValueError, match="no field 'crop'"):
    convert_tool.preprocessing("crop=1.0", None)


def test_convert_command_line(tmp_path, timm_file):
  dst = str(tmp_path / "cli.safetensors")
  cmd = [sys.executable, "-m", "spdfq_jax.tools.convert", timm_file, dst]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 1 and "error: " in out.stderr and "num_heads=?" in out.stderr
  assert "Traceback" not in out.stderr
  out = subprocess.run(cmd + ["--arch=vit:num_heads=4"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"wrote {dst}" in out.stdout and "--config.model.checkpoint=" in out.stdout
  assert native.read_metadata(dst)["kwargs"]["num_heads"] == 4
