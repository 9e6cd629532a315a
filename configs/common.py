"""Shared defaults of every run config (configs as code, big_vision style).

A run config is `get_config(arg) -> ConfigDict` with these blocks:
  model    name (timm registry name or built-in asset; with a checkpoint, any label),
           checkpoint path, and arch: the architecture of a checkpoint outside the
           registry ('vit:num_heads=4', see spdfq_jax/models/arch.py; empty = the
           registry name's, our own format's metadata, or read from the file's shapes)
  data     which evaluation / real-calibration data and where it lives
  methods  comma-separated rows: noise | inversion | psaq | spdfq | smi | mimiq | real
  bits     comma-separated 'w4a4,w3a3'; empty = quant.w_bits / quant.a_bits
  synth    every field of `spdfq_jax.synth.default_config`, unset (None) = the method's
           default, so one block serves all methods and any field is a command-line override
  quant    w_bits, a_bits, preset, and every field of `spdfq_jax.quant.default_config`
           the same way (`--config.quant.recon.iters=20`)
  eval     batch size, an optional image limit (0 = the whole split: the paper protocol),
           integer: evaluate quantized rows on the integer model where there is one
  seed, num_images, export, export_to (a copy of the single row's quantized model at this
  path, which must not exist), paper (the paper's ImageNet top-1 for this model, keyed
  '<method>_w<W>a<A>' and 'fp'; each row of the report shows its own)
"""
from __future__ import annotations

from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from spdfq_jax.models import zoo
from spdfq_jax.quant import config as quant_config
from spdfq_jax.synth import config as synth_config

# Filled in by main from the run (model input normalisation, config.seed, config.num_images).
_SYNTH_FROM_RUN = ("method", "num_images", "seed", "mean", "std")
# Picked by the row's bit setting (config.bits or quant.w_bits / a_bits).
_QUANT_FROM_RUN = ("weights.bits", "acts.bits", "preset")
# Leaves whose default is None, with the type a command-line value parses to.
_NONE_TYPES = {"softmax.bits": int, "softmax.shift": float}

# Paper names -> registry names.
MODELS = {
    "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224", "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
}

# ImageNet top-1 (%) reported by the paper (arXiv 2412.16553), 32 images:
# (model, method, 'wXaY') -> number. FP accuracies under (model, 'fp', '').
PAPER: dict[tuple[str, str, str], float] = {}
_W4A4 = {  # FP, noise, PSAQ-ViT, SPDFQ
    "vit_small": (81.39, 6.02, 47.24, 50.32), "vit_base": (84.54, 0.15, 36.32, 51.84),
    "deit_tiny": (72.21, 17.43, 47.75, 52.06), "deit_small": (79.85, 20.89, 58.28, 62.29),
    "deit_base": (81.85, 47.20, 71.75, 72.17), "swin_small": (83.20, 31.92, 73.19, 74.74),
    "swin_base": (85.27, 30.14, 71.84, 76.42),
}
for _m, (_fp, _noise, _psaq, _spdfq) in _W4A4.items():
  PAPER[(_m, "fp", "")] = _fp
  PAPER[(_m, "noise", "w4a4")] = _noise
  PAPER[(_m, "psaq", "w4a4")] = _psaq
  PAPER[(_m, "spdfq", "w4a4")] = _spdfq
for _m, (_psaq, _spdfq) in {"vit_small": (77.20, 78.40), "vit_base": (76.65, 79.16),
                            "deit_small": (75.85, 77.31), "swin_base": (82.00, 83.03)}.items():
  PAPER[(_m, "psaq", "w6a6")] = _psaq
  PAPER[(_m, "spdfq", "w6a6")] = _spdfq
PAPER[("vit_base", "real", "w4a4")] = 68.16
_W4A4_V2_SMI = {  # PSAQ-ViT V2, SMI
    "vit_small": (41.53, 24.33), "vit_base": (26.32, 35.27), "deit_tiny": (30.20, 30.14),
    "deit_small": (45.53, 42.77), "deit_base": (66.43, 65.33), "swin_small": (65.55, 65.85),
    "swin_base": (67.42, 65.23),
}
for _m, (_psaq_v2, _smi) in _W4A4_V2_SMI.items():
  PAPER[(_m, "psaq_v2", "w4a4")] = _psaq_v2
  PAPER[(_m, "smi", "w4a4")] = _smi


def paper_numbers(model: str) -> ml_collections.ConfigDict:
  """Every number the paper reports for a model ('spdfq_w4a4', 'fp', ...); empty for others."""
  return ml_collections.ConfigDict(
      {f"{method}_{bits}" if bits else method: v
       for (m, method, bits), v in PAPER.items() if m == model})


def _placeholders(cfg: ml_collections.ConfigDict, skip: tuple[str, ...], prefix: str = ""
                  ) -> ml_collections.ConfigDict:
  """The same tree with every leaf an unset, typed placeholder (lists become tuples)."""
  out = ml_collections.ConfigDict()
  for key, value in cfg.items():
    path = prefix + key
    if path in skip:
      continue
    if isinstance(value, ml_collections.ConfigDict):
      out[key] = _placeholders(value, skip, path + ".")
    elif value is None:
      out[key] = config_dict.placeholder(_NONE_TYPES.get(path, object))
    else:
      kind = tuple if isinstance(value, (list, tuple)) else type(value)
      out[key] = config_dict.placeholder(kind)
  return out


def synth_block(**values: Any) -> ml_collections.ConfigDict:
  """Every synthesis field unset except `values` (applied to whichever method a row uses)."""
  block = _placeholders(synth_config.default_config("spdfq"), _SYNTH_FROM_RUN)
  for k, v in values.items():
    block[k] = v
  return block


def quant_block(w_bits: int = 4, a_bits: int = 4, preset: str = "full",
                **values: Any) -> ml_collections.ConfigDict:
  """Bits and preset, plus every quantization field unset except `values` (dotted keys ok)."""
  block = _placeholders(quant_config.default_config(w_bits, a_bits, preset), _QUANT_FROM_RUN)
  block.w_bits, block.a_bits, block.preset = w_bits, a_bits, preset
  for k, v in values.items():
    node = block
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = tuple(v) if isinstance(v, list) else v
  return block


def parse_bits_arg(arg: Optional[str], default: str = "w4a4") -> tuple[int, int]:
  """'w4a4' -> (4, 4); the config argument of the per-model files."""
  arg = (arg or default).strip().lower()
  if not (arg.startswith("w") and "a" in arg[1:]):
    raise ValueError(f"config argument must look like w4a4 / w6a6 / w3a3, got {arg!r}")
  w, a = arg[1:].split("a", 1)
  return int(w), int(a)


def get_config(model: str = "deit_small", *, checkpoint: Optional[str] = None,
               methods: str = "spdfq", w_bits: int = 4, a_bits: int = 4,
               data: str = "imagenet") -> ml_collections.ConfigDict:
  """Defaults for one paper model (short name, e.g. 'vit_base') on ImageNet."""
  name = MODELS.get(model, model)
  c = ml_collections.ConfigDict()
  c.title = ""
  c.description = ""
  c.model = ml_collections.ConfigDict()
  c.model.name = name
  # timm weights, e.g. `huggingface-cli download timm/<tag> --local-dir checkpoints/<tag>`;
  # empty = a built-in asset (fmnist_vit / fmnist_swin).
  if checkpoint is None:
    checkpoint = (f"checkpoints/{zoo.entry(name).checkpoint_tag}/model.safetensors"
                  if name in zoo.REGISTRY else "")
  c.model.checkpoint = checkpoint
  c.model.arch = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = data  # imagenet | fashion_mnist | scenes (the built-in test beds)
  # ImageNet: a folder with val/<wnid>/*.JPEG (train/ for the real row), or a TFDS
  # data_dir holding imagenet2012 (prepared from downloads/manual/*.tar on first use).
  c.data.dir = "data/imagenet" if data == "imagenet" else ""
  c.data.source = "auto"  # auto | folder | tfds
  c.data.manual_dir = ""
  c.data.workers = 16  # decoding threads

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 128
  c.eval.limit = 0  # 0 = every image of the split
  # Quantized rows run on the integer model (quant.integer) where the quantizer has one,
  # else on the fake-quant model; each row's eval_path says which.
  c.eval.integer = True

  c.methods = methods
  c.bits = ""
  c.num_images = 32
  c.seed = 0
  c.synth = synth_block()
  c.quant = quant_block(w_bits, a_bits)
  c.export = True
  c.export_to = ""
  short = next((k for k, v in MODELS.items() if v == name), name)
  c.paper = paper_numbers(short)
  return c


def paper_model_config(model: str, arg: Optional[str]) -> ml_collections.ConfigDict:
  """The config of a per-model file: `arg` ('w4a4', 'w6a6', 'w3a3') picks the bits."""
  w, a = parse_bits_arg(arg)
  c = get_config(model, w_bits=w, a_bits=a)
  c.title = f"{MODELS[model]} SPDFQ W{w}A{a}"
  return c


def comparison(c: ml_collections.ConfigDict, title: str) -> ml_collections.ConfigDict:
  """A single-method config turned into the all-sources table: every calibration source
  (noise, inversion, PSAQ-ViT, PSAQ-ViT V2 (from its paper), SPDFQ, SMI, MimiQ, real images)
  at W4A4 and W3A3."""
  c.title = title
  c.methods = "noise,inversion,psaq,psaq_v2,spdfq,smi,mimiq,real"
  c.bits = "w4a4,w3a3"
  return c
