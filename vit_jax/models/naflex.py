"""NaFlex / NaViT: a ViT over pre-patchified images of any size, packed into sequences.

NaViT (Dehghani et al. 2023, "patch n' pack") packs the patches of several images of
different sizes into one fixed-length sequence; NaFlex (SigLIP 2, big_vision's
``naflex_vit``) keeps each image near its aspect ratio and resamples the position
embedding per image. ``NaFlexViT`` is the plain ``VisionTransformer`` with its hooks
overridden, so its parameters are the ViT's (``embedding`` HWIO kernel,
``Transformer/posembed_input`` for the stored grid ``image_size / patch_size``) and a
vision_transformer/big_vision/timm checkpoint of a ``gap`` or ``map`` ViT loads as is.

Inputs are a dict of fixed shapes (``vit_jax.data.packing`` builds them):

* ``patches`` ``[B, L, p*p*C]``: patches flattened in (row, column, channel) order,
  ``p`` the run patch size (``flexi_patch_size`` or ``patch_size``; the kernel is
  PI-resized to it as in FlexiViT).
* ``segment_ids`` ``[B, L]`` int: image ``k`` of a pack has id ``k + 1``; 0 is padding.
* ``positions`` ``[B, L, 2]`` int: each patch's (row, column) in its image's grid.
* ``grid_sizes`` ``[B, K, 2]`` int: each image slot's grid (rows, columns); ``K`` is
  the fixed number of images per pack, an empty slot has ``(0, 0)``.

Outputs are per image: logits (or features with ``num_classes=0``) ``[B, K, ...]``;
an empty slot's are finite and meaningless. Attention is block-diagonal
(``segment_ids`` through ``vit_jax.kernels``: the XLA reference or the flash kernel),
pooling (``gap`` or ``map``) reads each image's own tokens, so an image's outputs
in a pack equal its outputs alone.
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers
from vit_jax.models.vit import (AddPositionEmbs, Encoder, FlexiPatchEmbed,
                                VisionTransformer)

Array = Any
INPUT_KEYS = ("patches", "segment_ids", "positions", "grid_sizes")


class Packed(NamedTuple):
  """The layout of a pack that the hooks pass along (``grid`` and pooled tokens)."""
  segment_ids: Array  # [B, L]
  positions: Array  # [B, L, 2]
  grid_sizes: Array  # [B, K, 2]


def _linear_weights(position: Array, size: Array, stored: int) -> Array:
  """``[..., stored]`` weights of output ``position`` of a ``size``-long axis, resampled
  from ``stored`` entries: ``jax.image.resize``'s antialiased linear kernel
  (half-pixel centres, triangle widened by the downsampling factor, normalised), for
  a ``size`` that is a traced per-image value."""
  size = jnp.maximum(size, 1).astype(jnp.float32)[..., None]
  inv_scale = stored / size
  sample = (position.astype(jnp.float32)[..., None] + 0.5) * inv_scale - 0.5
  x = jnp.abs(sample - jnp.arange(stored, dtype=jnp.float32)) / jnp.maximum(inv_scale, 1.0)
  weights = jnp.maximum(0.0, 1.0 - x)
  return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-6)


class PackedEncoder(Encoder):
  """``Encoder`` whose learned table is stored for ``posemb_grid`` and resampled per
  image (the grid argument is a ``Packed``)."""

  def add_position_embedding(self, x: Array, grid: Any = None) -> Array:
    if not self.learned_posemb:
      raise ValueError("NaFlex needs posemb='learn' (resampled per image)")
    h0, w0 = self.posemb_grid
    # The plain ViT's parameter (gap/map: no prefix slot), added to zeros: the table.
    table = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(
        jnp.zeros((1, h0 * w0, x.shape[-1]), x.dtype))
    table = table.reshape(h0, w0, -1).astype(jnp.float32)
    segment = jnp.maximum(grid.segment_ids - 1, 0)  # padding reads slot 0 (ignored)
    sizes = jnp.take_along_axis(grid.grid_sizes, segment[..., None], axis=1)  # [B, L, 2]
    rows = _linear_weights(grid.positions[..., 0], sizes[..., 0], h0)  # [B, L, h0]
    cols = _linear_weights(grid.positions[..., 1], sizes[..., 1], w0)  # [B, L, w0]
    posemb = jnp.einsum("bla,blc,acd->bld", rows, cols, table,
                        precision=jax.lax.Precision.HIGHEST)
    return x + posemb.astype(x.dtype)


class NaFlexViT(VisionTransformer):
  """A ``VisionTransformer`` over packed, pre-patchified images (see the module doc).

  Settings are the ViT's; ``classifier`` must be "gap" or "map" (a class token per
  image is not packed here), ``posemb`` "learn", ``attention`` "softmax", no token
  reduction. ``attention_impl`` "pallas" runs the flash kernel with segment ids.
  """

  def _check_packed(self, inputs: Any) -> None:
    if not isinstance(inputs, dict) or any(k not in inputs for k in INPUT_KEYS):
      raise ValueError(f"NaFlexViT takes a dict with keys {INPUT_KEYS} (see "
                       "vit_jax.data.packing); got "
                       f"{sorted(inputs) if isinstance(inputs, dict) else type(inputs)}")
    if self.classifier not in ("gap", "map"):
      raise ValueError(f"NaFlex pools per image: classifier must be 'gap' or 'map', got "
                       f"{self.classifier!r}")
    if self.posemb != "learn" or self.attention != "softmax":
      raise ValueError("NaFlex needs posemb='learn' and attention='softmax'; got "
                       f"posemb={self.posemb!r}, attention={self.attention!r}")
    if self.attention_dropout_rate:  # the dropping path has no segment ids
      raise ValueError("attention_dropout_rate must be 0 with packed inputs, got "
                       f"{self.attention_dropout_rate}")
    if any(np.atleast_1d(self.token_merging)) or self.token_keep_rate < 1:
      raise ValueError("token reduction (token_merging, token_keep_rate) is not "
                       "supported with packed inputs")
    batch, length = inputs["segment_ids"].shape
    expect = {"patches": (batch, length), "positions": (batch, length, 2)}
    for key, shape in expect.items():
      if tuple(inputs[key].shape[:len(shape)]) != shape or inputs[key].ndim != 3:
        raise ValueError(f"packed input {key!r} has shape {inputs[key].shape}; expected "
                         f"{shape + (() if key == 'positions' else ('features',))}")
    sizes = inputs["grid_sizes"]
    if sizes.ndim != 3 or sizes.shape[0] != batch or sizes.shape[2] != 2:
      raise ValueError(f"packed input 'grid_sizes' has shape {sizes.shape}; expected "
                       f"({batch}, images_per_pack, 2)")

  def embed_patches(self, inputs: Any) -> tuple[Array, Packed]:
    packed = Packed(jnp.asarray(inputs["segment_ids"]), jnp.asarray(inputs["positions"]),
                    jnp.asarray(inputs["grid_sizes"]))
    x = FlexiPatchEmbed(self.hidden_size, self.patch_size, self.run_patch_size,
                        resize_method=self.flexi_resize, use_bias=self.patch_bias,
                        dtype=self.compute_dtype, param_dtype=self.storage_dtype,
                        name="embedding")(jnp.asarray(inputs["patches"]))
    return x, packed

  def packed_encoder(self, packed: Packed) -> nn.Module:
    """The ``Transformer`` as a ``PackedEncoder`` (``make_encoder``'s settings) whose
    attention sees the segments: block-diagonal."""
    h, w = layers.to_2tuple(self.image_size)
    attention_fn = functools.partial(self._attention_fn(), segment_ids=packed.segment_ids)
    return PackedEncoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        learned_posemb=True, pre_norm=self.pre_norm, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, gelu_approximate=self.gelu_approximate,
        attention_fn=attention_fn, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, norm_epsilon=self.norm_epsilon,
        posemb_grid=(h // self.patch_size, w // self.patch_size),
        dtype=self.compute_dtype, param_dtype=self.storage_dtype, name="Transformer")

  def forward_features(self, inputs: Any, *, train: bool = False) -> Array:
    x, packed = self.embed_patches(inputs)
    return self.packed_encoder(packed)(x, grid=packed, train=train)

  def pool(self, x: Any) -> Array:
    """``(tokens, Packed)`` -> ``[B, K, D]``: one vector per image from its tokens."""
    tokens, packed = x
    batch, length, dim = tokens.shape
    images = packed.grid_sizes.shape[1]
    # [B, L, K]: token l belongs to image k.
    member = packed.segment_ids[..., None] == jnp.arange(1, images + 1)
    if self.classifier == "gap":
      weights = member.astype(jnp.float32)
      sums = jnp.einsum("blk,bld->bkd", weights, tokens.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
      counts = jnp.maximum(jnp.sum(weights, axis=1), 1.0)[..., None]
      return (sums / counts).astype(tokens.dtype)
    # MAP: the probe attends over each image's tokens (the pack repeated per image).
    repeated = jnp.broadcast_to(tokens[:, None], (batch, images, length, dim))
    mask = jnp.moveaxis(member, 2, 1).reshape(batch * images, length)
    pooled = layers.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                            gelu_approximate=self.gelu_approximate,
                            dtype=self.compute_dtype, param_dtype=self.storage_dtype,
                            name="MAPHead_0")(
                                repeated.reshape(batch * images, length, dim), mask=mask)
    return pooled.reshape(batch, images, dim)

  @nn.compact
  def __call__(self, inputs: Any, *, train: bool = False) -> Any:
    self._check_config()
    self._check_packed(inputs)
    tokens = self.forward_features(inputs, train=train)
    packed = Packed(jnp.asarray(inputs["segment_ids"]), jnp.asarray(inputs["positions"]),
                    jnp.asarray(inputs["grid_sizes"]))
    return self.forward_head((tokens, packed), train=train)


def naflex(model: VisionTransformer, **settings) -> NaFlexViT:
  """The NaFlex version of a ``VisionTransformer`` (same fields and parameters)."""
  if not isinstance(model, VisionTransformer):
    raise ValueError(f"naflex takes a VisionTransformer, got {type(model).__name__}")
  fields = {f: getattr(model, f) for f in model.__dataclass_fields__
            if f not in ("parent", "name")}
  return NaFlexViT(**{**fields, **settings})

