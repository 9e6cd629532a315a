"""Bad inputs: each stops `main` with one InputError naming the field or file and the fix,
before any stage runs (synthesis and quantization here are stand-ins that fail if called)."""
import json
import os
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
from safetensors.numpy import save_file

from spdfq_jax import main
from spdfq_jax import workdir as workdir_lib
from spdfq_jax.models import convert, native, zoo
from spdfq_jax.quant import config as quant_config
from spdfq_jax.synth import config as synth_config
from parity_util import fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST, reason="needs the Fashion-MNIST IDX files")


def _never(*args, **kwargs):
  raise AssertionError("a bad input must stop the run before this stage")


def _stages():
  from spdfq_jax import models  # pylint: disable=g-import-not-at-top
  return main.Stages(models.load, synth_config.default_config, _never,
                     quant_config.default_config, _never, None)


def _config(**fields):
  """The demo config, small, with dotted `fields` set ('quant.w_bits': 3)."""
  from configs import fmnist_w4a4  # pylint: disable=g-import-not-at-top
  c = fmnist_w4a4.get_config()
  c.unlock()
  c.eval.limit, c.eval.batch_size, c.num_images = 8, 8, 2
  for dotted, value in fields.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _refused(tmp_path, match, **fields) -> str:
  with pytest.raises(main.InputError, match=match) as e:
    main.run(_config(**fields), str(tmp_path / "work"), _stages())
  # A refused run leaves no config behind, so the corrected command is not refused in turn.
  assert not (tmp_path / "work" / workdir_lib.CONFIG_FILE).exists()
  return str(e.value)


def _rgb_checkpoint(directory, num_classes):
  """A tiny 3-channel ViT in our own format (for the ImageNet cases)."""
  module = zoo.custom_vit(img_size=32, patch_size=8, width=16, depth=1, num_heads=2,
                          num_classes=num_classes)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))["params"]
  path = str(directory / f"rgb_vit_{num_classes}.safetensors")
  native.save(path, module, params)
  return path


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
  return _rgb_checkpoint(tmp_path_factory.mktemp("ckpt"), 1000)


# ----------------------------------------------------------------------------- model


def test_unknown_model(tmp_path):
  msg = _refused(tmp_path, "model.name", **{"model.name": "deit_smal_patch16_224"})
  assert "Did you mean 'deit_small_patch16_224'" in msg and "--config.model.checkpoint" in msg


def test_checkpoint_not_there(tmp_path):
  msg = _refused(tmp_path, "is not a file", **{"model.name": "deit_tiny_patch16_224",
                                                "model.checkpoint": str(tmp_path / "x.pth")})
  assert "huggingface-cli download timm/deit_tiny_patch16_224.fb_in1k" in msg


def test_checkpoint_of_another_architecture(tmp_path):
  _, path, _ = fixture("vit")  # a timm ViT of width 48, patch 8, 2 blocks
  msg = _refused(tmp_path, "does not match", **{"model.name": "deit_tiny_patch16_224",
                                                "model.checkpoint": path})
  assert "another architecture: the file has patch_size=8 (model 16), width=48 (model 192)" in msg
  assert msg.count("\n  missing:") <= convert.MAX_LISTED and "more missing" in msg
  assert "--config.model.arch" in msg


def test_checkpoint_of_another_family(tmp_path):
  _, path, _ = fixture("swin")
  _refused(tmp_path, "holds a Swin .*not a ViT",
           **{"model.arch": "vit:num_heads=2", "model.checkpoint": path})


def _truncated(path, tmp_path):
  data = open(path, "rb").read()
  out = tmp_path / ("cut" + os.path.splitext(path)[1])
  out.write_bytes(data[:len(data) // 2])
  return str(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "npz"])
def test_truncated_or_corrupt_file(tmp_path, damage):
  _, path, _ = fixture("vit")
  if damage == "truncated":
    bad, match = _truncated(path, tmp_path), "truncated: its tensors need"
  elif damage == "garbage":
    bad, match = str(tmp_path / "g.safetensors"), "header claims"
    open(bad, "wb").write(os.urandom(64))
  elif damage == "empty":
    bad, match = str(tmp_path / "e.safetensors"), "empty or truncated"
    open(bad, "wb").close()
  else:
    np.savez(tmp_path / "v.npz", **{"embedding/kernel": np.zeros((8, 8, 3, 48), np.float32)})
    bad, match = _truncated(str(tmp_path / "v.npz"), tmp_path), "cannot be read as .npz"
  msg = _refused(tmp_path, match, **{"model.arch": "vit:num_heads=3", "model.checkpoint": bad})
  assert bad in msg and "again" in msg


def test_missing_unused_and_misshaped_keys(tmp_path):
  _, path, _ = fixture("vit")
  sd = convert.read_safetensors(path)
  sd["blocks.0.attn.qkv_renamed.weight"] = sd.pop("blocks.0.attn.qkv.weight")
  del sd["norm.bias"]
  sd["blocks.1.mlp.fc1.bias"] = sd["blocks.1.mlp.fc1.bias"][:-1].copy()
  bad = str(tmp_path / "bad.safetensors")
  save_file(sd, bad)
  msg = _refused(tmp_path, "2 missing, 1 unused, 1 wrongly shaped",
                 **{"model.arch": "vit:num_heads=3", "model.checkpoint": bad})
  for line in ("missing: blocks_0/attn/qkv/kernel", "missing: norm/bias",
               "unused: blocks_0/attn/qkv_renamed/kernel",
               "wrong shape: blocks_1/mlp/fc1/bias: checkpoint (191,), model (192,)"):
    assert line in msg


def test_heads_that_the_file_cannot_give(tmp_path):
  _, path, _ = fixture("vit")
  msg = _refused(tmp_path, "num_heads cannot be read", **{"model.name": "",
                                                          "model.checkpoint": path})
  assert "'vit:num_classes=10,img_size=32,patch_size=8,width=48,depth=2,num_heads=?'" in msg


def test_image_size_not_a_multiple_of_the_patch(tmp_path):
  _, path, _ = fixture("vit")
  _refused(tmp_path, "img_size 30 is not a multiple of patch_size 8",
           **{"model.arch": "vit:img_size=30,num_heads=3", "model.checkpoint": path})


def test_bad_architecture_spec(tmp_path):
  _refused(tmp_path, r"model.arch: .*no field 'heads' \(did you mean num_heads\?\)",
           **{"model.arch": "vit:heads=3", "model.checkpoint": __file__})


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("field,value,match", [
    ("quant.w_bits", 0, r"quant.w_bits / quant.a_bits: weight bits 0 are not an integer in 2..8"),
    ("quant.a_bits", 1, r"activation bits 1 are not an integer in 2..8"),
    ("bits", "w9a4", r"^bits: weight bits 9 are not"),
    ("bits", "w4.5a4", r"bits='w4.5a4': .*not of the form w4a4"),
    ("quant.softmax.bits", 9, r"quant: softmax.bits: bits must be an integer in 2..8, got 9"),
])
def test_bits(tmp_path, field, value, match):
  _refused(tmp_path, match, **{field: value})


def _parse(argv):
  """The command line as main parses it: --config (overrides applied as it is defined),
  then the other flags."""
  fv = flags.FlagValues()
  main.define_config_flag(fv, ["prog"] + argv)
  return main.parse_flags(["prog"] + argv, fv)


def test_non_integer_bits_on_the_command_line():
  with pytest.raises(SystemExit, match=r"--config.quant.w_bits=4.5: invalid literal for int"):
    _parse([f"--config={ROOT}/configs/fmnist_w4a4.py", "--config.quant.w_bits=4.5"])


@pytest.mark.parametrize("override,match", [
    ("--config.synth.no_such_field=1", r"has no field 'synth.no_such_field'\. Fields of synth: "),
    ("--config.quant.recon.iterz=3", r"Did you mean --config.quant.recon.iters\?"),
    ("--config.nmu_images=3", r"Did you mean --config.num_images\?"),
])
def test_typo_in_a_config_override(override, match):
  with pytest.raises(SystemExit, match=match):
    _parse([f"--config={ROOT}/configs/fmnist_w4a4.py", override])
  assert _parse([f"--config={ROOT}/configs/fmnist_w4a4.py", "--config.synth.iterations=7"])


def test_typo_on_the_real_command_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "spdfq_jax.main", "--config.synth.no_such_field=1",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "error: --config.synth.no_such_field=1: configs/fmnist_w4a4.py has no field" in out.stderr


@pytest.mark.parametrize("field,value,match", [
    ("num_images", 0, r"num_images=0: must be an integer >= 1"),
    ("num_images", -3, r"num_images=-3"),
    ("eval.batch_size", 0, r"eval.batch_size=0"),
    ("methods", "spdfq,psaqvit", r"methods='spdfq,psaqvit': unknown psaqvit; choose from"),
])
def test_counts_and_methods(tmp_path, field, value, match):
  _refused(tmp_path, match, **{field: value})


@needs_fmnist
@pytest.mark.parametrize("fields,match", [
    ({"synth.iterations": 3},
     r"row spdfq: synth.iterations \(3\) must split evenly into synth.rounds \(2\)"),
    ({"methods": "psaq,smi", "model.name": "fmnist_swin"}, r"row smi: method smi needs a ViT"),
    ({"methods": "smi", "synth.smi_prune_ratio": (0.9, 0.9, 0.9, 0.9)},
     r"prunes every patch of the 8 x 8 grid"),
    ({"methods": "smi", "synth.smi_prune_at": (3, 4, 10, 20)}, r"at least 2 apart"),
    ({"methods": "mimiq", "synth.tv_mode": "target"},
     r"row mimiq: synth.tv_mode 'target': mimiq minimises its TV"),
    ({"methods": "mimiq", "synth.jitter": (1, 2, 3)}, r"row mimiq: synth.jitter \(1, 2, 3\)"),
    ({"methods": "psaq_v2", "synth.microbatches": 2},
     r"row psaq_v2: synth.microbatches must be 1 for psaq_v2"),
    ({"methods": "psaq_v2", "synth.v2_student_lr": 0.0},
     r"row psaq_v2: synth.v2_student_lr must be > 0"),
])
def test_synthesis_settings_refused_before_any_stage(tmp_path, fields, match):
  """Found from the config and the model's layout alone, before the FP evaluation."""
  _refused(tmp_path, match, **fields)
  assert not any(p.name.startswith("fp_eval") for p in (tmp_path / "work").glob("*"))


@pytest.mark.skipif(not FMNIST, reason="needs the Fashion-MNIST IDX files")
def test_num_images_not_a_multiple_of_the_devices(tmp_path):
  """3 images on 2 devices: padded for the sharded synthesis step, never dropped."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "main_child.py"),
                        str(tmp_path), "3"], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got == {"devices": 2, "num_images": 3, "set": 3, "eval_count": 7, "finite": True}


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_fashion_mnist_directory(tmp_path, where):
  d = tmp_path / "fmnist"
  if where == "empty":
    d.mkdir()
  _refused(tmp_path, rf"data.dir='{d}': Fashion-MNIST test files .* not found .*apt-get install",
           **{"data.dir": str(d)})


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_imagenet_directory(tmp_path, rgb_checkpoint, where, monkeypatch):
  from spdfq_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(imagenet, "tfds_source", _never)  # said at once, without TFDS
  d = tmp_path / "imagenet"
  if where == "empty":
    d.mkdir()
  msg = _refused(tmp_path, "ImageNet validation data not found",
                 **{"data.name": "imagenet", "data.dir": str(d), "model.name": "",
                    "model.checkpoint": rgb_checkpoint})
  assert "ILSVRC2012_img_val.tar" in msg and "--config.data.dir" in msg


def _image_folder(root, classes):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in classes:
    os.makedirs(root / "val" / name)
    Image.new("RGB", (40, 40)).save(root / "val" / name / "a.png")
  return str(root)


def test_imagenet_folder_with_the_wrong_classes(tmp_path, rgb_checkpoint):
  """An ImageNet folder (labels 0..999 by WordNet id) and a 10-class head."""
  data = _image_folder(tmp_path / "data", ("n01440764", "n01443537", "n01484850"))
  msg = _refused(tmp_path, r"holds ImageNet-1k \(1000 classes.* but the model predicts 10",
                 **{"data.name": "imagenet", "data.dir": data, "model.name": "",
                    "model.checkpoint": _rgb_checkpoint(tmp_path, 10)})
  assert "val/<wnid>/" in msg
  # Class folders named otherwise are not taken for ImageNet at all.
  data = _image_folder(tmp_path / "other", ("cat", "dog", "fox"))
  _refused(tmp_path, r"class folders of .*/val, cat, dog, fox ..., are not named by WordNet id",
           **{"data.name": "imagenet", "data.dir": data, "model.name": "",
              "model.checkpoint": rgb_checkpoint})


def test_real_row_without_training_images(tmp_path, rgb_checkpoint):
  data = _image_folder(tmp_path / "data", ("n01440764",))
  _refused(tmp_path, r"the real row needs training images: ImageNet train data not found",
           **{"data.name": "imagenet", "data.dir": data, "methods": "real",
              "data.source": "folder", "model.name": "", "model.checkpoint": rgb_checkpoint})


@needs_fmnist
def test_grey_model_on_imagenet(tmp_path):
  _refused(tmp_path, "the model takes 1-channel images",
           **{"data.name": "imagenet", "data.dir": str(tmp_path)})


# ----------------------------------------------------------------------------- workdir, export


def test_workdir_not_writable(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(main.InputError, match=r"workdir .* is not a writable directory.*--workdir"):
    main.run(_config(), str(tmp_path / "file" / "work"), _stages())
  if os.geteuid() != 0:  # root writes anywhere
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(main.InputError, match="not a writable directory"):
      main.run(_config(), str(ro), _stages())


def test_workdir_holding_another_config(tmp_path):
  workdir_lib.write_config(str(tmp_path), _config())
  changed = _config(**{"quant.w_bits": 3, "synth.iterations": 7, "data.workers": 9,
                       "title": "another title"})
  with pytest.raises(main.InputError) as e:
    main.run(changed, str(tmp_path), _stages())
  msg = str(e.value)
  assert "holds a run of another config (2 fields differ)" in msg
  assert "quant.w_bits: 4 -> 3" in msg and "synth.iterations: 100 -> 7" in msg
  assert "--reuse_workdir" in msg and "workers" not in msg
  workdir_lib.prepare_workdir(str(tmp_path), changed, reuse=True)  # allowed when asked for
  workdir_lib.write_config(str(tmp_path), changed)
  # A config from before a field was added (model.arch) is the same run.
  old = json.load(open(tmp_path / "config.json"))
  assert old["quant"]["w_bits"] == 3
  del old["model"]["arch"]
  json.dump(old, open(tmp_path / "config.json", "w"))
  workdir_lib.prepare_workdir(str(tmp_path), changed, reuse=False)


def test_export_path_that_exists(tmp_path):
  (tmp_path / "q.safetensors").write_text("keep me")
  _refused(tmp_path, r"export_to=.*q.safetensors' exists: delete it or choose another path",
           export_to=str(tmp_path / "q.safetensors"))
  assert (tmp_path / "q.safetensors").read_text() == "keep me"
  _refused(tmp_path, "export_to=.* takes the one row of a single-row config; this one has 2",
           export_to=str(tmp_path / "new.safetensors"), bits="w4a4,w3a3")
