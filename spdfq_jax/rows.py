"""What a config asks for: its rows (synthesis method x bit setting), the stage functions
that run them (`Stages`), and each row's stage settings from the config's explicit fields."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import ml_collections

REAL = "real"  # the real-data reference row: training images instead of synthetic ones


@dataclasses.dataclass
class Stages:
  """The stage functions the pipeline wires together (tests swap in small fakes)."""
  load_model: Callable[..., tuple[Any, Any]]
  synth_config: Callable[..., ml_collections.ConfigDict]
  generate: Callable[..., Any]
  quant_config: Callable[..., ml_collections.ConfigDict]
  quantize: Callable[..., Any]
  export: Optional[Callable[[str, Any], None]]


def default_stages() -> Stages:
  from spdfq_jax import models, quant, synth  # pylint: disable=g-import-not-at-top
  return Stages(models.load, synth.default_config, synth.generate, quant.default_config,
                quant.quantize, quant.export.save)



def set_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Dotted path -> value of every leaf that is not None (placeholders left unset drop out)."""
  out = {}
  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(v, prefix + k + ".")
      elif v is not None:
        out[prefix + k] = list(v) if isinstance(v, tuple) else v
  walk(cfg.to_dict(), "")
  return out



def parse_bits(spec: str) -> list[tuple[int, int]]:
  """'w4a4,w3a3' -> [(4, 4), (3, 3)]."""
  out = []
  for item in filter(None, (s.strip().lower() for s in spec.split(","))):
    m = re.fullmatch(r"w(\d+)a(\d+)", item)
    if not m:
      raise ValueError(f"bit setting {item!r} is not of the form w4a4 (integer weight and "
                       "activation bits)")
    out.append((int(m.group(1)), int(m.group(2))))
  return out


def rows_of(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(method, w_bits, a_bits) of every row, bit settings outermost."""
  methods = [m.strip() for m in config.methods.split(",") if m.strip()]
  bits = parse_bits(config.bits) if config.bits else [(config.quant.w_bits, config.quant.a_bits)]
  return [(m, w, a) for w, a in bits for m in methods]


def assign(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets the dotted field of `cfg`; a field it lacks is a ValueError."""
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"unknown setting {dotted!r}")
  node[leaf] = tuple(value) if isinstance(value, list) and isinstance(node[leaf], tuple) else value


def quant_config(stages: Stages, config: ml_collections.ConfigDict, w_bits: int,
                 a_bits: int) -> ml_collections.ConfigDict:
  """quant.default_config for one bit setting, with the config's explicit quant fields."""
  fields = set_fields(config.quant)
  preset = fields.pop("preset", "full")
  fields.pop("w_bits", None)
  fields.pop("a_bits", None)
  fields.setdefault("recon.seed", config.seed)
  return stages.quant_config(w_bits, a_bits, preset, **fields)
