"""Masked autoencoder pretraining (He et al., 2022, "Masked Autoencoders Are Scalable
Vision Learners") around any plain ViT.

``MaskedAutoencoder(backbone=masked_vit(<a VisionTransformer>), mask_ratio=0.75, ...)`` maps
images to ``(predicted pixels [B, N, p*p*C], mask [B, N])``:

* ``random_masking``: per image, the ``keep_count(N, mask_ratio)`` patches with the
  lowest uniform noise stay visible (a static count, so every shape is static under
  ``jit``); ``mask`` is 1 on the hidden patches.
* The encoder is the ViT itself through its hooks (``MaskedViT``): its
  ``MaskingEncoder.add_position_embedding`` adds the position table and then keeps the
  prefix tokens and the visible patches only, so the blocks run on those; its
  ``forward_head`` returns the normed tokens. Its parameters are the ViT's, with the
  same names, under ``encoder/``.
* A light decoder (``decoder_embed``, ``mask_token``, a ``vit.Encoder`` named
  ``decoder`` with its own learned position table, ``decoder_pred``) puts the mask
  tokens back in patch order and predicts every patch's pixels.

``mae_loss``: the mean squared error on the hidden patches only, against the pixels of
each patch normalised by that patch's mean and variance (``norm_pix_loss``; unbiased
variance and epsilon 1e-6, as in the paper's code, which uses torch's ``var``).

``encoder_params``: an MAE checkpoint's flat arrays -> the ViT's (``encoder/``
stripped) plus the names dropped (the decoder); ``vit_jax.weights`` uses it so that
``config.init=<an MAE workdir>`` fine-tunes the encoder in the classification trainer.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, vit

Array = Any
ENCODER = "encoder/"


def keep_count(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per image (at least one), as in the paper's ``int(N * (1 - r))``."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mae mask_ratio must be in [0, 1), got {mask_ratio}")
  return max(1, int(num_patches * (1 - mask_ratio)))


def masking_from_noise(noise: Array, keep: int) -> tuple[Array, Array, Array]:
  """``noise [B, N]`` -> (visible indices ``[B, keep]``, restore order ``[B, N]``, mask).

  The ``keep`` lowest-noise patches stay visible, in increasing noise order;
  ``restore`` undoes the shuffle (``take_along_axis(shuffled, restore)`` is patch
  order); ``mask [B, N]`` is 1.0 on the hidden patches.
  """
  shuffle = jnp.argsort(noise, axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  visible = shuffle[:, :keep]
  mask = (restore >= keep).astype(jnp.float32)
  return visible, restore, mask


def random_masking(key: jax.Array, batch: int, num_patches: int, keep: int):
  return masking_from_noise(jax.random.uniform(key, (batch, num_patches)), keep)


def patchify(images: Array, patch_size: int) -> Array:
  """NHWC images -> ``[B, N, p*p*C]`` in the patch embedding's (row-major) order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, patch_size: int, grid: tuple[int, int]) -> Array:
  b = patches.shape[0]
  (gh, gw), p = grid, patch_size
  c = patches.shape[-1] // (p * p)
  x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)


def pixel_target(images: Array, patch_size: int, norm_pix_loss: bool = True) -> Array:
  """The regression target: patches, each normalised by its own mean and variance."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if not norm_pix_loss:
    return target
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + 1e-6)


def mae_loss(pred: Array, target: Array, mask: Array) -> Array:
  """Mean over hidden patches of the per-patch mean squared error."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class MaskingEncoder(vit.Encoder):
  """The ViT's ``Transformer`` on the visible patches only (same parameters)."""
  visible: Optional[Array] = None  # [B, keep] patch indices; None: every patch
  num_prefix_tokens: int = 1

  def add_position_embedding(self, x: Array, grid: Any = None) -> Array:
    x = super().add_position_embedding(x, grid)  # the full table, then the subset
    if self.visible is None:
      return x
    prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
    patches = jnp.take_along_axis(patches, self.visible[..., None], axis=1)
    return jnp.concatenate([prefix, patches], axis=1)


class MaskedViT(vit.VisionTransformer):
  """A ViT whose blocks see only ``visible`` patches; returns all its normed tokens."""
  visible: Optional[Array] = None

  encoder_type = MaskingEncoder

  def make_encoder(self, **settings) -> nn.Module:
    return super().make_encoder(visible=self.visible,
                                num_prefix_tokens=self.num_prefix_tokens, **settings)

  def forward_head(self, x: Array, *, train: bool = False) -> Array:
    del train
    return x

  def _check_config(self):
    super()._check_config()
    if any(np.atleast_1d(self.token_merging)) or self.token_keep_rate < 1:
      raise ValueError("mae: token reduction (token_merging, token_keep_rate) does not "
                       "combine with masking; set them to their defaults")


def masked_vit(model: nn.Module) -> MaskedViT:
  """The ``MaskedViT`` with ``model``'s settings (``model`` a plain ViT)."""
  if type(model) is not vit.VisionTransformer:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f"mae needs a plain ViT (a vit_* model); got "
                     f"{type(model).__name__}")
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return MaskedViT(**fields)


class MaskedAutoencoder(nn.Module):
  """MAE: ``images -> (pred [B, N, p*p*C], mask [B, N])``; needs a ``"mask"`` rng.

  ``backbone``: a ``MaskedViT`` (``masked_vit(models.create(name, ...))``) that gives
  the encoder's settings; the encoder built from it here is named ``encoder``.
  """
  backbone: MaskedViT
  mask_ratio: float = 0.75
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 512

  def masking(self, images: Array) -> tuple[Array, Array, Array]:
    gh, gw = self.backbone.patch_grid(images.shape[1], images.shape[2])
    return random_masking(self.make_rng("mask"), images.shape[0], gh * gw,
                          keep_count(gh * gw, self.mask_ratio))

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> tuple[Array, Array]:
    visible, restore, mask = self.masking(images)
    encoder = self.backbone.clone(visible=visible, num_classes=0, name="encoder",
                                 parent=self)
    latent = encoder(images, train=train)  # [B, prefix + keep, D]
    prefix = encoder.num_prefix_tokens
    dtype = encoder.compute_dtype
    x = layers.Dense(self.decoder_width, dtype=dtype, name="decoder_embed")(latent)
    batch, num_patches = mask.shape
    mask_token = self.param("mask_token", nn.initializers.normal(0.02),
                            (1, 1, self.decoder_width))
    hidden = jnp.broadcast_to(mask_token.astype(x.dtype),
                              (batch, num_patches - visible.shape[1], self.decoder_width))
    patches = jnp.concatenate([x[:, prefix:], hidden], axis=1)  # shuffled order
    patches = jnp.take_along_axis(patches, restore[..., None], axis=1)  # patch order
    x = jnp.concatenate([x[:, :prefix], patches], axis=1)
    x = vit.Encoder(num_layers=self.decoder_depth, mlp_dim=self.decoder_mlp_dim,
                    num_heads=self.decoder_heads, dtype=dtype, name="decoder")(
                        x, train=train)
    p, channels = encoder.patch_size, images.shape[-1]
    pred = layers.Dense(p * p * channels, dtype=dtype, name="decoder_pred")(x[:, prefix:])
    return pred.astype(jnp.float32), mask


def encoder_params(flat: dict[str, Any]) -> Optional[tuple[dict, list[str]]]:
  """An MAE checkpoint's flat arrays -> (the encoder's, under ViT names; dropped
  names), or None when ``flat`` is not an MAE checkpoint."""
  if not any(k.startswith(ENCODER) for k in flat) or "mask_token" not in flat:
    return None
  kept = {k[len(ENCODER):]: v for k, v in flat.items() if k.startswith(ENCODER)}
  return kept, sorted(k for k in flat if not k.startswith(ENCODER))


def reconstruction_grid(images: Array, pred: Array, mask: Array, patch_size: int,
                        norm_pix_loss: bool = True, columns: int = 8) -> Array:
  """``[1, 3h, columns*w, C]`` in [0, 1]: originals, masked inputs, reconstructions
  (visible patches pasted back; with ``norm_pix_loss`` the prediction is denormalised
  with each patch's true mean and variance, as the paper's figures do)."""
  images = images[:columns].astype(jnp.float32)
  pred, mask = pred[:columns], mask[:columns]
  target = patchify(images, patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  m = mask[..., None]
  grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
  masked = unpatchify(target * (1 - m), patch_size, grid)
  pasted = unpatchify(target * (1 - m) + pred * m, patch_size, grid)
  rows = [jnp.concatenate(list(r), axis=1) for r in (images, masked, pasted)]
  picture = jnp.concatenate(rows, axis=0)
  lo, hi = images.min(), images.max()
  return jnp.clip((picture - lo) / jnp.maximum(hi - lo, 1e-6), 0, 1)[None]


__all__ = ["MaskedAutoencoder", "MaskedViT", "MaskingEncoder", "masked_vit", "keep_count",
           "masking_from_noise", "random_masking", "patchify", "unpatchify",
           "pixel_target", "mae_loss", "encoder_params", "reconstruction_grid"]
