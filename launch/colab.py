# %% [markdown]
# # spdfq_jax on Colab
# Data-free W4A4 quantization of the built-in Fashion-MNIST ViT with SPDFQ: calibration
# images synthesised from the model alone, quantization with block-wise reconstruction,
# evaluation, and the figures. Any runtime works (CPU, GPU or TPU); the iteration counts
# below are cut so that the whole notebook takes a minute or two.
#
# This notebook is generated from `launch/colab.py` (`python launch/make_notebook.py`).

# %%
# Installs the package, only where it is not importable yet (a fresh Colab runtime).
import importlib.util
import os
import subprocess
import sys

REPO_URL = ""  # this repository's git URL, e.g. https://github.com/ORG/spdfq_jax

if importlib.util.find_spec("spdfq_jax") is None:
  if not REPO_URL:
    raise RuntimeError("spdfq_jax is not installed: set REPO_URL in this cell to the "
                       "repository's git URL (or upload the repository and run "
                       "`pip install -e .` in it), then run the cell again.")
  subprocess.run(["git", "clone", "-q", REPO_URL, "spdfq_jax"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "spdfq_jax"], check=True)
  os.chdir("spdfq_jax")  # the configs/ directory is imported from here
  sys.path.insert(0, os.getcwd())
  importlib.invalidate_caches()

from spdfq_jax.data import fashion_mnist

if not os.path.isdir(fashion_mnist.DEFAULT_DIR):  # the four IDX files, from the distribution
  subprocess.run(["apt-get", "update", "-qq"], check=True)
  subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)

import jax

print(jax.devices())  # Colab's GPU and TPU runtimes ship a matching jax build

# %% [markdown]
# ## The demo config, with small iteration counts
# `configs/fmnist_w4a4.py` is what `./run demo` runs: 32 images, 100 synthesis steps,
# 100 reconstruction iterations per block, the 10,000 test images (a few minutes on a
# laptop CPU). Here it is cut to 8 images, 20 steps, 10 iterations and 1,000 test images;
# delete the overrides for the full demo. `main.run` is the same function as
# `python -m spdfq_jax.main`: it writes the workdir and returns the report.

# %%
from configs import fmnist_w4a4
from spdfq_jax import main

WORKDIR = "colab_work"

config = fmnist_w4a4.get_config()
config.num_images = 8
config.synth.iterations, config.synth.warmup = 20, 2
config.quant.recon.iters = 10
config.eval.limit = 1000
out = main.run(config, WORKDIR, reuse_workdir=True)
row = out["rows"][0]
print(f"FP top-1 {row['fp_top1']:.2f}, SPDFQ W4A4 top-1 {row['quant_top1']:.2f} "
      f"({row['eval_count']} test images)")

# %% [markdown]
# ## The synthetic calibration images

# %%
from IPython.display import Image, Markdown, display

display(Image(filename=os.path.join(row["synth_dir"], "grid.png")))

# %% [markdown]
# ## Attention priors against the attention the images achieve
# One row per image: the image, then for each of three heads of the last APA block the
# prior the image was given and the attention it achieves, with their correlation r.

# %%
display(Image(filename=os.path.join(row["synth_dir"], "attention.png")))

# %% [markdown]
# ## The report

# %%
from spdfq_jax import report

display(Markdown(report.markdown(out)))

# %% [markdown]
# ## A paper setting on ImageNet
# Put the timm weights and the validation set on the runtime (or mount Drive), then run the
# same entry point as on a workstation, in a terminal or a cell starting with `!`.
# Synthesis and reconstruction checkpoint into the workdir, so a disconnected runtime
# resumes where it stopped:
#
#     huggingface-cli download timm/vit_base_patch16_224.augreg_in21k_ft_in1k \
#         --local-dir checkpoints/vit_base_patch16_224.augreg_in21k_ft_in1k
#     python -m spdfq_jax.main --config=configs/vitb_w4a4.py \
#         --config.data.dir=/content/drive/MyDrive/imagenet --workdir=/content/drive/MyDrive/work/vitb
