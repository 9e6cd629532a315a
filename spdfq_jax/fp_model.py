"""The configured full-precision model: what `models.load` gets, the load itself (a bad
file or architecture is an InputError naming the setting), the model's name in the report,
and its evaluation transform."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from absl import logging
import ml_collections

from spdfq_jax import data as data_lib
from spdfq_jax.inputs import InputError
from spdfq_jax.models import zoo
from spdfq_jax.rows import Stages


def load_model(stages: Stages, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(module, params) of the configured model; a bad file or architecture is an InputError
  that says which setting to change."""
  try:
    module, params = stages.load_model(load_spec(config), config.model.checkpoint or None)
  except (ValueError, FileNotFoundError, ImportError) as e:
    m = config.model
    raise InputError(
        f"{e}\n(model.name={m.name!r}, model.arch={m.get('arch') or ''!r}, model.checkpoint="
        f"{m.checkpoint!r}: fix the file, or give its architecture with "
        "--config.model.arch=... / a matching --config.model.name=...)") from e
  _warn_if_renamed(config, module)
  return module, params


def _warn_if_renamed(config: ml_collections.ConfigDict, module: Any) -> None:
  """Our own format carries its architecture, which wins over model.name: say so when the
  two differ, since the report still names the model model.name."""
  name = load_spec(config)
  if name not in zoo.REGISTRY or not isinstance(module, (zoo.VisionTransformer,
                                                         zoo.SwinTransformer)):
    return
  from spdfq_jax.models import arch  # pylint: disable=g-import-not-at-top
  named = zoo.build(name, num_classes=module.num_classes)
  if arch.module_spec(named) != arch.module_spec(module):
    logging.warning("%s holds %s, not %s (%s): its own architecture is used",
                    config.model.checkpoint, arch.module_spec(module), name,
                    arch.module_spec(named))


def preprocessing_of(config: ml_collections.ConfigDict, module: zoo.Model, params: Any
                     ) -> zoo.Preprocessing:
  """The eval transform: the test bed's for a built-in test bed; else the checkpoint's own
  (our format's metadata), the registry's, or timm's defaults, at the model's input size."""
  if config.data.name in data_lib.TEST_BEDS:
    return data_lib.test_bed(config.data.name).preprocessing(zoo.in_channels(module, params))
  pre = None
  path = config.model.checkpoint
  if path and path.endswith(".safetensors"):
    from spdfq_jax.models import native  # pylint: disable=g-import-not-at-top
    p = (native.read_metadata(path) or {}).get("preprocessing")
    if p:
      pre = zoo.Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
  base = (config.model.get("arch") or "").partition(":")[0].strip() or config.model.name
  if pre is None and base in zoo.REGISTRY:
    pre = zoo.entry(base).preprocessing
  if pre is None:
    logging.warning("no preprocessing known for %s: timm's defaults (crop 0.875, ImageNet "
                    "mean/std)", model_label(config))
    pre = zoo.Preprocessing()
  return dataclasses.replace(pre, input_size=module.img_size)


def model_label(config: ml_collections.ConfigDict) -> str:
  """The model's name in the report: model.name, or the checkpoint's when the name is only
  the built-in default (an asset) or empty."""
  from spdfq_jax.models import convert  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.checkpoint and (not m.name or m.name in convert.ASSETS):
    stem = os.path.splitext(os.path.basename(m.checkpoint))[0]
    if stem in ("model", "pytorch_model", "checkpoint"):  # hub layout: <tag>/model.*
      stem = os.path.basename(os.path.dirname(os.path.abspath(m.checkpoint))) or stem
    return stem
  return m.name or m.get("arch") or "model"


def load_spec(config: ml_collections.ConfigDict) -> Optional[str]:
  """What `models.load` gets as the model: model.arch, else a registry name or built-in
  asset, else None (the checkpoint says: our format's metadata, or its shapes)."""
  from spdfq_jax.models import convert  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.get("arch"):
    return m.arch
  if m.checkpoint and m.name in convert.ASSETS:
    return None  # the test-bed default name; the given file describes itself
  if m.name in zoo.REGISTRY or m.name in convert.ASSETS:
    return m.name
  return None
