"""TensorBoard pictures for the classification trainer (``config.tensorboard_pictures``).

Written through clu's metric writer, beside the scalars:

* ``hparams``: the flattened config, once (TensorBoard's HParams tab);
* ``train/inputs`` at step 1 of a fresh run: a grid of the first batch *after*
  preprocessing (what the model sees: crops, augmentation, normalisation);
* at each evaluation: ``attention/rollout`` (Abnar & Zuidema's rollout from the class
  token, or averaged over tokens without one) and ``attention/last_block`` (the last
  block's head-averaged class-token map) over a few eval images, for plain ViTs;
  and the histogram ``params/norms`` of every parameter tensor's L2 norm.

Attention pictures come from ``visualize.attention_maps``, which recomputes the
softmax from the queries and keys Flax captures in an unscanned plain-ViT block. The
hierarchical families (Swin, MaxViT, PVT, ...) attend within windows or over pooled
keys, so one token-by-token map per block does not exist there; they get
``features/stage_{i}`` instead: the L2 norm of each position's features in every
stage's NHWC map (``forward_intermediates``), over the image. Scanned ViTs and
token-reducing ViTs (whose token count changes between blocks) get no attention
pictures, and the console says so once. The other pictures work for every model.
Everything here runs in a single-process run only (one process cannot compute over
parameters sharded across processes), on a few images: a tiny ViT's pictures cost well
under a second per evaluation.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models, visualize
from vit_jax.trainers import common


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 1) -> np.ndarray:
  """``[1, rows*(h+pad), columns*(w+pad), c]`` float in [0, 1]: each image min-max
  scaled on its own (inputs may be normalised by any mean and std)."""
  images = np.asarray(images, np.float32)
  low = images.min(axis=(1, 2, 3), keepdims=True)
  high = images.max(axis=(1, 2, 3), keepdims=True)
  images = (images - low) / np.maximum(high - low, 1e-8)
  n, h, w, c = images.shape
  columns = min(columns, n)
  rows = -(-n // columns)
  grid = np.ones((rows * (h + pad), columns * (w + pad), c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = image
  return grid[None]


def _flat_hparams(tree: Any, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat_hparams(value, f"{prefix}{key}."))
    elif isinstance(value, (bool, int, float, str)):
      out[f"{prefix}{key}"] = value
    elif value is not None:
      out[f"{prefix}{key}"] = str(value)
  return out


def _stage_norms(model, variables, images) -> dict:
  """``{"stage_i": [batch, h, w]}``: each position's feature norm, per sown stage."""
  _, sown = models.forward_intermediates(model, variables, images)
  return {k: jnp.linalg.norm(v.astype(jnp.float32), axis=-1) for k, v in sown.items()
          if k.startswith("stage_") and v.ndim == 4}


def _maps_and_rollout(model, variables, images):
  """``([batch, tokens, tokens] rollout, [batch, tokens, tokens] last block's map)``,
  heads averaged."""
  maps = visualize.attention_maps(model, variables, images)
  return visualize.attention_rollout(maps), maps[-1].mean(axis=1)


class Pictures:
  """What the trainer calls; every method is a no-op when pictures are off."""

  def __init__(self, writer, model, config, *, enabled: bool, num_images: int = 4):
    self.writer, self.model = writer, model
    # Main-process only, and off in a multi-process run: the norms and attention maps
    # are computations over parameters sharded across processes, which one process
    # cannot run alone (the others would meet mismatched collectives).
    self.enabled = enabled and jax.process_count() == 1
    if enabled and not self.enabled:
      common.console("tensorboard pictures: off in a multi-process run (they are drawn "
                     "by one process)")
    self.num_images = num_images
    self._attention_skipped: Optional[str] = None
    self._said_stages = False
    self._eval_images: Optional[np.ndarray] = None
    # One compiled program each (eager ops would compile one program per op and shape).
    self._norms = jax.jit(lambda params: jnp.stack([
        jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32))
        for x in jax.tree.leaves(params)]))
    self._maps = jax.jit(lambda variables, images: _maps_and_rollout(
        model, variables, images))
    self._stages = jax.jit(lambda variables, images: _stage_norms(
        model, variables, images))
    if self.enabled:
      self.writer.write_hparams(_flat_hparams(config.to_dict()))

  def inputs(self, step: int, images: jax.Array) -> None:
    """The grid of a (global, sharded) batch's first local images."""
    if not self.enabled:
      return
    local = np.asarray(images.addressable_data(0))[:16]
    self.writer.write_images(step, {"train/inputs": image_grid(local)})

  def set_eval_images(self, images: np.ndarray) -> None:
    self._eval_images = np.asarray(images)[:self.num_images]

  def evaluation(self, step: int, variables: dict) -> None:
    if not self.enabled:
      return
    norms = np.asarray(self._norms(variables["params"]))
    self.writer.write_histograms(step, {"params/norms": norms})
    if self._eval_images is not None and self._attention_skipped is None:
      self._attention(step, variables)

  def _rgb(self) -> np.ndarray:
    images = self._eval_images
    return images if images.shape[-1] == 3 else np.repeat(images[..., :1], 3, axis=-1)

  def _attention(self, step: int, variables: dict) -> None:
    images = self._eval_images
    blocks = variables["params"].get("Transformer", {})
    if not any(name.startswith("encoderblock_") for name in blocks):
      if self.model is not None and self._stage_maps(step, variables):
        return
      self._attention_skipped = ("attention pictures need a plain ViT with unscanned "
                                 "Transformer/encoderblock_{i}")
      common.console(f"tensorboard pictures: {self._attention_skipped}; none written")
      return
    try:
      rollout, last = jax.device_get(self._maps(variables, jnp.asarray(images)))
    except (ValueError, TypeError) as e:  # not a plain unscanned ViT (see docstring)
      self._attention_skipped = str(e).split("\n")[0]
      common.console(f"tensorboard pictures: no attention maps for this model "
                     f"({self._attention_skipped}); none written")
      return
    tokens = rollout.shape[-1]
    side = int(np.sqrt(tokens))
    prefix = tokens - side * side
    if prefix:  # what the class token gathers from the patches
      rollout_heat, last_heat = rollout[:, 0, prefix:], last[:, 0, prefix:]
    else:  # no class token: how much each patch is attended to on average
      rollout_heat, last_heat = rollout.mean(axis=1), last.mean(axis=1)
    self.writer.write_images(step, {
        "attention/rollout": self._render(rollout_heat.reshape(-1, side, side)),
        "attention/last_block": self._render(last_heat.reshape(-1, side, side))})

  def _stage_maps(self, step: int, variables: dict) -> bool:
    """Writes ``features/stage_{i}``; False when the model sows no NHWC stages."""
    try:
      norms = jax.device_get(self._stages(variables, jnp.asarray(self._eval_images)))
    except (ValueError, TypeError):
      return False
    if not norms:
      return False
    if not self._said_stages:
      self._said_stages = True
      common.console(f"tensorboard pictures: features/stage_0..{len(norms) - 1} (feature "
                     "norms per stage; this family has no token-by-token attention map)")
    self.writer.write_images(step, {f"features/{k}": self._render(v)
                                    for k, v in sorted(norms.items())})
    return True

  def _render(self, heat: np.ndarray, size: int = 96) -> np.ndarray:
    """``[batch, size, size, 3]``: each eval image with its ``[h, w]`` heat in red."""
    return np.stack([np.asarray(visualize.heatmap_image(image, h, size=size))
                     for image, h in zip(self._rgb(), heat)])
