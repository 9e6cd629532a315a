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
  return logits, _sown(state, "attn"), _sown(state, "attn_v")


def apply_with_scores(module, variables: Any, images: jax.Array
                      ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
  """(logits, scores per block, attn_v per block): the scores are the attention logits
  `(q / sqrt(head_dim)) k^T` before Swin's relative position bias and shift mask and before
  the softmax, (B, heads, N, N) (Swin: (B * windows, heads, N, N))."""
  logits, state = module.apply(variables, images, mutable=["intermediates"])
  return logits, _sown(state, "attn_scores"), _sown(state, "attn_v")


def _sown(state: Any, name: str) -> list[jax.Array]:
  """The values sown under `name`, in forward order."""
  flat = flax.traverse_util.flatten_dict(state["intermediates"])
  # Sow order is forward order; flatten_dict sorts keys, so sort by numeric path instead.
  def order(path):
    return tuple(int(p.split("_")[-1]) if p.split("_")[-1].isdigit() else p for p in path)
  return [flat[k][0] for k in sorted((k for k in flat if k[-1] == name), key=order)]
