"""Attention maps of a ViT, for looking at what a model attends to (colabs).

``attention_maps`` recomputes every block's softmax attention from the queries and
keys the model computed (captured with Flax's ``capture_intermediates``), so it
needs no change to the model. ``attention_rollout`` (Abnar & Zuidema, 2020)
multiplies the head-averaged maps with the residual through the blocks.
``heatmap_image`` renders a map over an image with PIL (no plotting library).
``merged_regions_image`` paints the patches each token holds after ToMe merging or
EViT fusion (the ``token_source_{i}`` intermediates) in their mean colour.
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


def token_assignment(source: Any, num_prefix_tokens: int, grid: tuple[int, int]
                     ) -> np.ndarray:
  """``[batch, gh, gw]``: which output token holds each input patch.

  ``source`` is a ``token_source_{i}`` intermediate, ``[batch, tokens, input_tokens]``
  with the prefix tokens first on both axes.
  """
  source = np.asarray(source)[:, :, num_prefix_tokens:]
  if source.shape[-1] != grid[0] * grid[1]:
    raise ValueError(f"source covers {source.shape[-1]} patches; grid {grid} has "
                     f"{grid[0] * grid[1]}")
  return source.argmax(axis=1).reshape(source.shape[0], *grid)


def merged_regions_image(image: np.ndarray, assignment: np.ndarray, size: int = 192):
  """A PIL image: each token's patches in their mean colour, with its outline.

  ``image`` is HWC in [-1, 1] or [0, 1]; ``assignment`` ``[gh, gw]`` is one image of
  ``token_assignment``. Patches of one token share a colour, as in ToMe's figures.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image, np.float32)
  if image.min() < 0:
    image = (image + 1) / 2
  gh, gw = assignment.shape
  ph, pw = image.shape[0] // gh, image.shape[1] // gw
  pixels = np.repeat(np.repeat(assignment, ph, 0), pw, 1)  # token of every pixel
  image = image[:gh * ph, :gw * pw]
  painted = np.zeros_like(image)
  for token in np.unique(assignment):
    inside = pixels == token
    painted[inside] = image[inside].mean(axis=0)
  edge = np.zeros(pixels.shape, bool)  # pixels whose right or lower neighbour differs
  edge[:, :-1] |= pixels[:, 1:] != pixels[:, :-1]
  edge[:-1] |= pixels[1:] != pixels[:-1]
  painted[edge] = 1.0
  return Image.fromarray((np.clip(painted, 0, 1) * 255).astype(np.uint8)).resize(
      (size, size), Image.NEAREST)
