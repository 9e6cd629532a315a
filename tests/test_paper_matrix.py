"""Every paper config and the Fashion-MNIST models through the user's command, end to end
(the scenes bed: tests/test_scenes.py).

Each cell parses a config file with its command-line overrides exactly as
`python -m spdfq_jax.main` does (`main.define_config_flag` + `main.parse_flags`) and runs
`main.run` with the real stages: load, FP evaluation, synthesis (or real images),
calibration, reparameterisation, reconstruction, evaluation, export. The paper configs run
on tiny random timm checkpoints of their family (tests/fixtures/paper, made by
make_paper_fixtures.py) and an ImageNet-layout folder of JPEGs under real WordNet ids; the
built-in models on their own bed. Iteration counts are tiny: the point is that every model
family, method and bit setting the README promises gets through to a report and an export.

The last test runs the command itself (`python -m spdfq_jax.main`) on 4 devices with an
image count they do not divide, for PSAQ-ViT (whose KDE grid spans the batch) and SMI (whose
kept tokens are gathered per image and calibrated sparsely), and compares its images with one
device's. The other methods' padding is tested at the synthesis level
(tests/test_synth_generate.py).
"""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from spdfq_jax import main, quant
from spdfq_jax import rows as rows_lib
from spdfq_jax.data import imagenet
from spdfq_jax.quant import student as student_lib

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "tests", "fixtures", "paper")
HAVE_FMNIST = os.path.exists("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
# Tiny counts for every cell: 2 images (3 where the row set trains), 2 synthesis steps,
# 1 reconstruction step per unit, a handful of evaluation images.
TINY = ["--config.num_images=2", "--config.synth.iterations=2", "--config.synth.warmup=1",
        "--config.quant.recon.iters=1", "--config.eval.batch_size=4"]
VIT_ARCH = "--config.model.arch=vit:num_heads=2"  # a timm ViT's qkv does not say its heads
SWIN_ARCH = "--config.model.arch=swin:img_size=224"  # nor does a Swin say its input size
NO_RECON = "--config.quant.recon.iters=0"
# SMI's pruning inside 2 steps: step 0 ranks the patches, step 1 keeps the top half.
SMI_PRUNE = ["--config.synth.smi_prune_at=(1,)", "--config.synth.smi_prune_ratio=(0.5,)"]

# id: (config argument, checkpoint fixture or None for a built-in model, extra flags).
# Together: the seven paper configs, the two Fashion-MNIST models, every method in each
# family (ViT, DeiT with its distillation token, Swin), and W4A4, W6A6 and W3A3.
CELLS = {
    # Reconstruction (both stages) through the command: vit_base, deit_tiny, deit_small,
    # deit_base and swin_base; the colab notebook runs it on the demo config. The other cells
    # stop before it (it compiles one step per unit and stage, the largest cost of a cell).
    "vit_small": ("configs/vit_small.py:w4a4", "vit",
                  [VIT_ARCH, "--config.methods=noise,inversion,smi,psaq_v2,mimiq", NO_RECON] + SMI_PRUNE),
    "vit_base": ("configs/vit_base.py:w6a6", "vit", [VIT_ARCH, "--config.methods=psaq,spdfq,real"]),
    "deit_tiny": ("configs/deit_tiny.py:w3a3", "deit_distilled",
                  [VIT_ARCH, "--config.methods=noise,inversion,psaq,spdfq,smi,mimiq,real"]
                  + SMI_PRUNE),
    "deit_small": ("configs/deit_small.py:w4a4", "deit", [VIT_ARCH]),
    "deit_base": ("configs/deit_base.py:w4a4", "deit", [VIT_ARCH, "--config.methods=noise"]),
    "swin_small": ("configs/swin_small.py:w4a4", "swin",
                   [SWIN_ARCH, "--config.methods=noise,inversion,psaq,psaq_v2,mimiq", NO_RECON]),
    "swin_base": ("configs/swin_base.py:w4a4", "swin", [SWIN_ARCH, "--config.methods=spdfq,real"]),
    "fmnist_vit": ("configs/fmnist_w4a4.py", None, ["--config.eval.limit=8", NO_RECON]),
    "fmnist_swin": ("configs/fmnist_w4a4.py", None,
                    ["--config.model.name=fmnist_swin", "--config.eval.limit=8", NO_RECON]),
    # The scenes bed through main: tests/test_scenes.py (configs/scenes_compare.py).
}
# The paper's ImageNet top-1 of the cells' rows (method.md's table); absent = not reported.
PAPER_TOP1 = {("vit_base", "psaq"): 76.65, ("vit_base", "spdfq"): 79.16,
              ("swin_base", "spdfq"): 76.42,
              ("deit_small", "spdfq"): 62.29, ("deit_base", "noise"): 47.20,
              ("swin_small", "noise"): 31.92, ("swin_small", "psaq"): 73.19,
              ("vit_small", "noise"): 6.02, ("vit_small", "smi"): 24.33,
              ("vit_small", "psaq_v2"): 41.53, ("swin_small", "psaq_v2"): 65.55}
SIZES = ((300, 200), (180, 260), (256, 256), (500, 375))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  """val/ and train/ with JPEGs of different sizes under real WordNet ids (labels 0, 1, 999)."""
  root = tmp_path_factory.mktemp("imagenet")
  wnids = imagenet.wnids()
  rng = np.random.default_rng(0)
  for split, per_class in (("val", 2), ("train", 2)):
    for c in (0, 1, 999):
      folder = root / split / wnids[c]
      folder.mkdir(parents=True)
      for i in range(per_class):
        w, h = SIZES[(c + i) % len(SIZES)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f"{i}.JPEG")
  return str(root)


def parse(argv: list[str]):
  """The config exactly as the command line builds it (file, ':arg', overrides, lock)."""
  fv = flags.FlagValues()
  main.define_config_flag(fv, ["prog"] + argv)
  main.parse_flags(["prog"] + argv, fv)
  return fv.config


def recording_stages(monkeypatch):
  """The real stages; quantize also keeps each row's quantized model, by its workdir, and
  the bits of every PSAQ-ViT V2 student built (under "students")."""
  stages = main.default_stages()
  made = {"students": []}
  build = student_lib.student
  monkeypatch.setattr(student_lib, "student", lambda module, params, w, a: (
      made["students"].append((w, a)) or build(module, params, w, a)))
  quantize = stages.quantize

  def keep(module, params, images, cfg, workdir=None, **kw):
    qm = quantize(module, params, images, cfg, workdir=workdir, **kw)
    made[os.path.dirname(workdir)] = qm
    made[os.path.dirname(workdir), "kw"] = kw
    return qm

  stages.quantize = keep
  return stages, made


@pytest.mark.parametrize("cell", list(CELLS))
def test_config_runs_end_to_end(cell, imagenet_dir, tmp_path, monkeypatch):
  config_arg, fixture, extra = CELLS[cell]
  if fixture is None and not HAVE_FMNIST:
    pytest.skip("needs the Fashion-MNIST IDX files")
  argv = [f"--config={os.path.join(ROOT, config_arg)}"] + TINY + extra
  if fixture is not None:
    argv += [f"--config.model.checkpoint={os.path.join(PAPER, fixture + '.safetensors')}",
             f"--config.data.dir={imagenet_dir}", "--config.data.workers=2"]
  config = parse(argv)
  stages, made = recording_stages(monkeypatch)
  out = main.run(config, str(tmp_path / "work"), stages, config_name=config_arg)

  methods = [m.strip() for m in config.methods.split(",")]
  bits = rows_lib.rows_of(config)[0][1:]
  assert [(r["method"], r["w_bits"], r["a_bits"]) for r in out["rows"]] == \
      [(m,) + bits for m in methods]
  assert os.path.exists(tmp_path / "work" / "report.md")
  for row in out["rows"]:
    for key in ("fp_top1", "fp_top5", "quant_top1", "quant_top5"):
      assert math.isfinite(row[key]) and 0 <= row[key] <= 100, (row["method"], key)
    assert row["eval_count"] == (6 if fixture else 8)
    assert row["eval_path"] == "integer", row["method"]  # the default quantizer has one
    if row["method"] != rows_lib.REAL:
      # PSAQ-ViT V2 drops the class guidance, so it has no class to fit.
      fits = {"prior_fit", "prior_fit_chance"} | ({"class_fit"} if row["method"] != "psaq_v2"
                                                  else set())
      assert fits <= set(row) and (row["method"] != "psaq_v2" or "class_fit" not in row)
      for png in ("grid.png", "attention.png"):
        assert os.path.exists(os.path.join(row["synth_dir"], png)), (row["method"], png)
    # Each row shows the paper's number for its own method and bits (none for the beds).
    assert row.get("paper_top1") == PAPER_TOP1.get((cell, row["method"])), row["method"]
    # SMI's rows calibrate on each image's kept patches only, the others on every patch.
    kept = np.load(os.path.join(row["synth_dir"], main.SET_FILE)).get("kept_patches")
    if row["method"] == "smi":
      assert made[row["row_dir"], "kw"] == {"sparse_patches": kept.shape[1]}
    else:
      assert kept is None and made[row["row_dir"], "kw"] == {}
    # PSAQ-ViT V2's images come from a student at the row's own bits.
    if row["method"] == "psaq_v2":
      assert made["students"] == [(row["w_bits"], row["a_bits"])]
      with open(os.path.join(row["synth_dir"], "config.json")) as f:
        saved = json.load(f)
      assert (saved["v2_w_bits"], saved["v2_a_bits"]) == (row["w_bits"], row["a_bits"])
    # The export loads back to the model it came from.
    qm = made[row["row_dir"]]
    loaded = quant.export.load(row["export"])
    images = np.asarray(np.load(os.path.join(row["synth_dir"], main.SET_FILE))["images"][:2])
    np.testing.assert_allclose(np.asarray(loaded.logits(jnp.asarray(images))),
                               np.asarray(qm.logits(jnp.asarray(images))), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs the Fashion-MNIST IDX files")
def test_command_on_four_devices_pads_the_batch_and_gives_one_devices_images(tmp_path):
  """5 images on 4 devices are padded to 8; the padding must change nothing (the PSAQ-ViT
  entropy spans its KDE grid over the valid images only: without the mask the images move
  by 0.37 here). One step per round: the devices' float rounding alone moves PSAQ-ViT's
  images by 1e-4 after 2 steps but by 0.1 after 4, as its sharp KDE amplifies it."""
  argv = ["--config=configs/fmnist_w4a4.py", "--config.methods=psaq,smi", *SMI_PRUNE,
          "--config.num_images=5", "--config.synth.iterations=2", "--config.synth.warmup=1",
          "--config.quant.preset=calib", "--config.quant.acts.method=minmax",
          "--config.quant.weights.method=minmax", "--config.eval.limit=8",
          "--config.export=False"]

  def command(devices: int) -> dict:
    workdir = tmp_path / f"d{devices}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run([sys.executable, "-m", "spdfq_jax.main", *argv, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sets = {}
    for d in (workdir / "synthetic").iterdir():
      sets[d.name.split("-")[0]] = np.load(d / main.SET_FILE)["images"]
    return sets

  one, four = command(1), command(4)
  assert sorted(one) == sorted(four) == ["psaq", "smi"]
  for method in one:
    assert one[method].shape[0] == 5
    np.testing.assert_allclose(four[method], one[method], atol=1e-3, err_msg=method)
