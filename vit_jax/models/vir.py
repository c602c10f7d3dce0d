"""ViR (Hatamizadeh et al., 2023): a plain ViT whose attention is replaced by retention.

The paper's code is not public (NVlabs/ViR holds only a README), so this follows the
paper: an isotropic ViT (16x16 patches, learned position embedding, pre-norm blocks
with an MLP of ratio 4) whose token mixer is multi-head retention (RetNet), with the
class token appended at the end of the sequence so that, under the causal decay, it
sees every patch; its final features feed the head. Per head, with ``γ_h < 1``::

  parallel:   Retention(X) = (Q K^T ⊙ D) V,   D_nm = γ_h^(n-m) for n >= m, else 0
  recurrent:  S_n = γ_h S_(n-1) + k_n^T v_n,   o_n = q_n S_n

(``q`` scaled by ``head_dim^-1/2``), which is ``vit_jax.kernels.gated_scan`` with the
per-head log decay ``log γ_h``: the chunked form the paper proposes for long
sequences. Details the paper leaves open follow a timm-style implementation
attributed to its authors that circulates publicly: decays ``γ_h = 1 - exp(l_h)`` with
``l_h`` evenly spaced from ``log(1/32)`` to ``log(1/512)`` over the heads, layer scale
(initial 1e-5) on both branches, a position embedding over the patch tokens only,
LayerNorm eps 1e-6 and biased projections. (That implementation's parallel form
applies a softmax, which its recurrent and chunkwise forms do not and which would
break the parallel/recurrent equivalence the paper is built on; it is not followed.)

Registered sizes are the paper's: ``vir_small_patch16_224`` (ViR-S/16, width 384,
12 blocks, 6 heads), ``vir_base_patch16_224`` (ViR-B/16, 768, 12, 12) and
``vir_large_patch16_224`` (ViR-L/16, 1024, 24, 16). Parameter tree::

  patch_embed, pos_embed, cls_token
  blocks_{i}/{norm1, retention/{qkv, out_proj}, ls1, norm2, mlp, ls2}
  norm, head

Sown: ``block_{i}`` (the patch tokens after block ``i`` as an NHWC map) and
``features``. No official checkpoints exist, so there is no converter.
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax import kernels, sharding
from vit_jax.models import layers
from vit_jax.models.registry import register_variant

Array = Any

# Tensor parallelism (see vit_jax.sharding): the fused q|k|v projection stays whole,
# ``out_proj`` reads the heads back and splits by them; the MLP follows ViT's rules.
PARAM_AXES = ((r"(^|/)retention/out_proj/kernel$", ("heads", "embed")),)
sharding.register_param_axes(PARAM_AXES)

VARIANTS = {
    "vir_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vir_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vir_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
}


def decay_rates(num_heads: int) -> np.ndarray:
  """``γ_h``: ``1 - γ`` log-spaced from 1/32 to 1/512 over the heads."""
  return 1.0 - np.exp(np.linspace(math.log(1 / 32), math.log(1 / 512), num_heads))


class Retention(nn.Module):
  """Causal multi-head retention over ``[B, L, d]`` tokens."""
  num_heads: int
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, length, dim = x.shape
    heads = self.num_heads
    qkv = layers.Dense(3 * dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="qkv")(x).reshape(batch, length, 3, heads, dim // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    log_decay = jnp.asarray(np.log(decay_rates(heads)), jnp.float32)
    g = jnp.broadcast_to(log_decay[:, None], (batch, length, heads, 1))
    out = kernels.gated_scan(q * (dim // heads) ** -0.5, k, v, g,
                             impl=self.attention_impl)
    return layers.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="out_proj")(out.reshape(batch, length, dim))


class LayerScale(nn.Module):
  init: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.constant(self.init), (x.shape[-1],),
                       self.param_dtype)
    return x * scale.astype(x.dtype)


class ViRBlock(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  layer_scale: float = 1e-5
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    norm = lambda name: layers.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    y = Retention(self.num_heads, attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="retention")(norm("norm1")(x))
    y = LayerScale(self.layer_scale, self.param_dtype, name="ls1")(y)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    y = layers.MlpBlock(mlp_dim=int(x.shape[-1] * self.mlp_ratio),
                        dropout_rate=self.dropout_rate, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x),
                                                                  train=train)
    y = LayerScale(self.layer_scale, self.param_dtype, name="ls2")(y)
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class ViR(nn.Module):
  """ViR classifier on NHWC images of ``image_size``.

  Attributes:
    num_classes: size of the head; 0 returns the class token's features.
    image_size, patch_size: the learned position embedding fixes the token grid.
    embed_dim, depth, num_heads, mlp_ratio: the ViT sizes.
    layer_scale: initial value of the per-channel branch scales.
    dropout_rate: in the MLP. drop_path_rate: stochastic depth of the last block,
      rising linearly from 0.
    attention_impl: backend of ``vit_jax.kernels.gated_scan`` for the retention.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layer_scale: float = 1e-5
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    kernels.resolve(self.attention_impl)
    p, size, dim = self.patch_size, self.image_size, self.embed_dim
    if images.shape[1:3] != (size, size) or size % p:
      raise ValueError(
          f"this ViR's learned position embedding is built for {size}x{size} images "
          f"with patch size {p}; got {images.shape[1]}x{images.shape[2]}. Create the "
          "model with image_size set to the (square, divisible) input size.")
    if dim % self.num_heads:
      raise ValueError(f"ViR's embed_dim={dim} must be divisible by "
                       f"num_heads={self.num_heads}")
    side = size // p
    x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                param_dtype=param_dtype, name="patch_embed")(images.astype(dtype))
    batch = x.shape[0]
    x = x.reshape(batch, side * side, dim) + self.param(
        "pos_embed", nn.initializers.normal(0.02), (1, side * side, dim),
        param_dtype).astype(dtype)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim), param_dtype)
    x = jnp.concatenate([x, jnp.tile(cls.astype(dtype), (batch, 1, 1))], axis=1)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, self.depth)
    for i in range(self.depth):
      x = ViRBlock(self.num_heads, mlp_ratio=self.mlp_ratio, layer_scale=self.layer_scale,
                   dropout_rate=self.dropout_rate, drop_path_rate=rates[i],
                   attention_impl=self.attention_impl, dtype=dtype,
                   param_dtype=param_dtype, name=f"blocks_{i}")(x, train=train)
      self.sow("intermediates", f"block_{i}", x[:, :-1].reshape(batch, side, side, dim))
    x = layers.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                     name="norm")(x)[:, -1]
    return layers.classifier_head(self, x, self.num_classes, dtype=dtype,
                                  param_dtype=param_dtype)


def _register_variants():
  for name, config in VARIANTS.items():
    register_variant(name, ViR, config, family="vir", doc=f"ViR ({name}), following the paper.")


_register_variants()
