"""Reading the attention maps and attention outputs that the blocks sow."""
from __future__ import annotations

from typing import Any

import flax
import jax


def apply_with_attention(module, variables: Any, images: jax.Array, **kwargs: Any
                         ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
  """(logits, attn per block, attn_v per block), blocks in forward order.

  attn: post-softmax probabilities (B, heads, N, N) (Swin: (B * windows, heads, N, N));
  attn_v: `attn @ v` merged over heads, before the output projection. `kwargs` go to the
  model's call (a ViT's `keep`).
  """
  logits, state = module.apply(variables, images, mutable=["intermediates"], **kwargs)
  flat = flax.traverse_util.flatten_dict(state["intermediates"])
  # Sow order is forward order; flatten_dict sorts keys, so sort by numeric path instead.
  def order(path):
    return tuple(int(p.split("_")[-1]) if p.split("_")[-1].isdigit() else p for p in path)
  attn = [flat[k][0] for k in sorted((k for k in flat if k[-1] == "attn"), key=order)]
  attn_v = [flat[k][0] for k in sorted((k for k in flat if k[-1] == "attn_v"), key=order)]
  return logits, attn, attn_v
