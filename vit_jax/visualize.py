"""Attention maps of a ViT, for looking at what a model attends to (colabs).

``attention_maps`` recomputes every block's softmax attention from the queries and
keys the model computed (captured with Flax's ``capture_intermediates``), so it
needs no change to the model. ``attention_rollout`` (Abnar & Zuidema, 2020)
multiplies the head-averaged maps with the residual through the blocks.
``heatmap_image`` renders a map over an image with PIL (no plotting library).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import tree


def attention_maps(model, variables: Any, images: Any) -> jax.Array:
  """``[blocks, batch, heads, tokens, tokens]`` softmax attention of a ViT."""
  def is_qk(module, method_name):
    return method_name == "__call__" and module.name in ("query", "key") and (
        "MultiHeadDotProductAttention" in "/".join(module.path))

  _, state = model.apply(variables, images, train=False, capture_intermediates=is_qk,
                         mutable=["intermediates"])
  flat = tree.sown(state["intermediates"])
  blocks = sorted({k.split("/MultiHeadDotProductAttention")[0] for k in flat
                   if "/query/" in k and k.startswith("Transformer/encoderblock_")},
                  key=lambda k: int(k.rsplit("_", 1)[1]))
  if not blocks:
    raise ValueError("no ViT attention found (unscanned Transformer/encoderblock_{i})")
  maps = []
  for block in blocks:
    prefix = f"{block}/MultiHeadDotProductAttention_1"
    q, k = flat[f"{prefix}/query/__call__"], flat[f"{prefix}/key/__call__"]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    maps.append(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
  return jnp.stack(maps)


def attention_rollout(maps: jax.Array) -> jax.Array:
  """``[batch, tokens, tokens]``: head-averaged maps with identity, multiplied in order."""
  tokens = maps.shape[-1]
  rollout = jnp.eye(tokens)[None]
  for layer in maps:
    a = layer.mean(axis=1) + jnp.eye(tokens)
    a = a / a.sum(-1, keepdims=True)
    rollout = a @ rollout
  return rollout


def heatmap_image(image: np.ndarray, heat: np.ndarray, size: int = 192):
  """A PIL image: ``image`` (HWC in [-1, 1] or [0, 1]) with ``heat`` (h x w) in red."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.float32)
  if image.min() < 0:
    image = (image + 1) / 2
  heat = np.asarray(heat, np.float32)
  heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
  base = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
      (size, size), Image.NEAREST).convert("RGB")
  red = np.zeros(heat.shape + (3,), np.uint8)
  red[..., 0] = (heat * 255).astype(np.uint8)
  overlay = Image.fromarray(red).resize((size, size), Image.BILINEAR)
  return Image.blend(base, overlay, 0.5)
