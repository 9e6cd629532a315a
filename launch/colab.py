# %% [markdown]
# # spdfq_jax on Colab (GPU or TPU runtime)
# Open as a notebook (Colab: File > Upload notebook, or jupytext --to ipynb launch/colab.py),
# or paste the cells. The first cell installs the package; the rest use the Python API,
# the same stage functions `python -m spdfq_jax.main` wires together.

# %%
# !git clone https://github.com/<you>/spdfq_jax && cd spdfq_jax && pip install -q -e .
# On a TPU runtime add: pip install -q "jax[tpu]"; on a GPU runtime: pip install -q "jax[cuda12]"
import jax
print(jax.devices())

# %% [markdown]
# ## The demo on the built-in Fashion-MNIST ViT (a few minutes)
# Fashion-MNIST: `apt-get install dataset-fashion-mnist`, or copy the four IDX .gz files
# somewhere and set `data_dir` below.

# %%
import numpy as np

from spdfq_jax import evaluate, models, quant, synth
from spdfq_jax.data import fashion_mnist

data_dir = None  # None: /usr/share/datasets/fashion-mnist
module, params = models.load("fmnist_vit")  # built-in asset, no path needed
pre = fashion_mnist.preprocessing()
test_x, test_y = fashion_mnist.load("test", data_dir)

scfg = synth.default_config("spdfq")
scfg.mean, scfg.std = pre.mean, pre.std
scfg.iterations, scfg.warmup = 400, 40
images = synth.generate(module, params, scfg, workdir="colab_work/synthetic").images

qcfg = quant.default_config(4, 4)
qmodel = quant.quantize(module, params, images, qcfg, workdir="colab_work/quant")
fp = evaluate.evaluate(lambda x: module.apply({"params": params}, x),
                       evaluate.batches_from_arrays(test_x, test_y, 1000), 1000)
q = evaluate.evaluate(qmodel.logits, evaluate.batches_from_arrays(test_x, test_y, 1000), 1000)
print(f"FP top-1 {fp['top1']:.2f}   SPDFQ W4A4 top-1 {q['top1']:.2f}")

# %% [markdown]
# ## A paper setting on ImageNet
# Put the timm weights and the validation set on the runtime (or mount Drive), then run
# the same entry point as on a workstation. Synthesis and reconstruction checkpoint into
# the workdir, so a disconnected runtime resumes where it stopped.

# %%
# !huggingface-cli download timm/vit_base_patch16_224.augreg_in21k_ft_in1k \
#     --local-dir checkpoints/vit_base_patch16_224.augreg_in21k_ft_in1k
# !python -m spdfq_jax.main --config=configs/vitb_w4a4.py \
#     --config.data.dir=/content/drive/MyDrive/imagenet --workdir=/content/drive/MyDrive/work/vitb
