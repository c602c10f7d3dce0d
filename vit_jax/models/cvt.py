"""CvT, Convolutional vision Transformer (Wu et al., 2021).

Three stages; each starts with a convolutional token embedding (an overlapping strided
conv + LayerNorm, which also shrinks the map) and runs transformer blocks whose
queries, keys and values come from *convolutional projections*: a depthwise 3x3 conv +
BatchNorm over the token map (stride 2 for keys and values, which cuts attention cost
by 4), then a linear layer. No position embedding; a class token joins in the last
stage only and bypasses the convolutions. Not in timm: this follows the official code
(microsoft/CvT, ``lib/models/cls_cvt.py`` with the configs of CvT-13/21/W24), including
its choices: QuickGELU MLPs, LayerNorm epsilon 1e-5, and attention scaled by
``dim ** -0.5`` (the full width, not the head width).

BatchNorm statistics live in the ``batch_stats`` collection (updated in training, used
in eval). Under ``jax.jit`` with a batch-sharded input they are computed over the whole
global batch, so data-parallel replicas stay in sync without extra collectives.
Stochastic depth rises linearly over all blocks (this project's convention); the
official configs apply it per stage ([0, 0, 0.1] for CvT-13/21).

Parameter tree::

  stage{s}/embed/{conv, norm}                  convolutional token embedding
  stage{s}/cls                                 class token (last stage)
  stage{s}/block_{j}/norm1, norm2, Mlp/Dense_{0,1}
  stage{s}/block_{j}/attention/conv_proj_{q,k,v}/{conv, bn}, proj_{q,k,v}, proj
  norm, head

Intermediates: ``stage_{s}`` (NHWC map after each stage, without the class token) and
``features`` (the normalised class token). Any input size works.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import sharding
from vit_jax.models import layers
from vit_jax.models.registry import register_variant

Array = Any
LN_EPS = 1e-5

# Tensor parallelism (see vit_jax.sharding): ``proj_{q,k,v}`` write heads one after
# the other (``[dim, heads * head_dim]``), so splitting their outputs splits heads;
# ``proj`` reads them back and ends in one all-reduce. The MLP (``Mlp``) is the
# shared layer.
PARAM_AXES = (
    (r"(^|/)attention/proj_[qkv]/kernel$", ("embed", "heads")),
    (r"(^|/)attention/proj_[qkv]/bias$", ("heads",)),
    (r"(^|/)attention/proj/kernel$", ("heads", "embed")),
)
sharding.register_param_axes(PARAM_AXES)


class ConvProjection(nn.Module):
  """Depthwise conv (no bias) + BatchNorm over a token map; returns tokens."""
  kernel_size: int
  stride: int
  padding: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    x = layers.DepthwiseConv(dim, (self.kernel_size,) * 2, strides=(self.stride,) * 2,
                             padding=((self.padding,) * 2,) * 2, use_bias=False,
                             dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    x = layers.batch_norm(train, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="bn")(x)
    return x.reshape(x.shape[0], -1, dim)


class ConvAttention(nn.Module):
  """Multi-head attention on convolutional projections of the token map."""
  num_heads: int
  qkv_bias: bool = True
  with_cls_token: bool = False
  kernel_size: int = 3
  stride_kv: int = 2
  stride_q: int = 1
  padding_kv: int = 1
  padding_q: int = 1
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, height: int, width: int, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, _, dim = x.shape
    if self.with_cls_token:
      cls, x = x[:, :1], x[:, 1:]
    spatial = x.reshape(batch, height, width, dim)

    def project(name, stride, padding):
      y = ConvProjection(self.kernel_size, stride, padding, name=f"conv_proj_{name}",
                         **kw)(spatial, train=train)
      if self.with_cls_token:
        y = jnp.concatenate([cls, y], axis=1)
      y = layers.Dense(dim, use_bias=self.qkv_bias, name=f"proj_{name}", **kw)(y)
      return y.reshape(batch, -1, self.num_heads, dim // self.num_heads)

    q = project("q", self.stride_q, self.padding_q)
    k = project("k", self.stride_kv, self.padding_kv)
    v = project("v", self.stride_kv, self.padding_kv)
    # The official scale is dim ** -0.5; the reference applies head_dim ** -0.5.
    q = q * (self.num_heads ** -0.5)
    dropout_fn = None
    if train and self.attention_dropout_rate > 0.0:
      dropout = nn.Dropout(rate=self.attention_dropout_rate)
      dropout_fn = lambda w: dropout(w, deterministic=False)
    y = layers.dot_product_attention(q, k, v, dropout_fn=dropout_fn)
    y = layers.Dense(dim, name="proj", **kw)(y.reshape(batch, -1, dim))
    return nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)


class CvTBlock(nn.Module):
  """Pre-norm block: x + attn(LN(x)) with conv projections, then x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  with_cls_token: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, height: int, width: int, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    y = layers.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
    y = ConvAttention(self.num_heads, qkv_bias=self.qkv_bias,
                      with_cls_token=self.with_cls_token,
                      attention_dropout_rate=self.attention_dropout_rate,
                      dropout_rate=self.dropout_rate, name="attention", **kw)(
                          y, height, width, train=train)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    y = layers.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)
    # The official MLP: QuickGELU, PyTorch's default Linear init (LeCun-like, zero bias).
    y = layers.MlpBlock(int(dim * self.mlp_ratio), dropout_rate=self.dropout_rate,
                        activation=layers.quick_gelu,
                        kernel_init=nn.initializers.lecun_normal(),
                        bias_init=nn.initializers.zeros, name="Mlp", **kw)(y, train=train)
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class Stage(nn.Module):
  """Token embedding, optional class token, blocks; returns the map and the class token."""
  hidden_size: int
  num_layers: int
  num_heads: int
  patch_size: int
  patch_stride: int
  patch_padding: int
  drop_path_rates: Sequence[float]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  with_cls_token: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # The convolutional token embedding: an overlapping strided conv, then LayerNorm.
    x = layers.ConvEmbed(self.hidden_size, self.patch_size, self.patch_stride,
                         self.patch_padding, conv_name="conv", name="embed", **kw)(x)
    batch, height, width, dim = x.shape
    x = x.reshape(batch, height * width, dim)
    if self.with_cls_token:
      cls = self.param("cls", nn.initializers.normal(stddev=0.02), (1, 1, dim),
                       self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), [batch, 1, 1]), x], axis=1)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    for j in range(self.num_layers):
      x = CvTBlock(self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                   with_cls_token=self.with_cls_token, dropout_rate=self.dropout_rate,
                   attention_dropout_rate=self.attention_dropout_rate,
                   drop_path_rate=self.drop_path_rates[j], name=f"block_{j}", **kw)(
                       x, height, width, train=train)
    cls = x[:, 0] if self.with_cls_token else None
    spatial = x[:, 1:] if self.with_cls_token else x
    return spatial.reshape(batch, height, width, dim), cls


class CvT(nn.Module):
  """CvT classifier. Call with NHWC images; returns float32 logits (or features).

  Per-stage settings are sequences of three. The head reads the last stage's class
  token (``cls_token[-1]``) or, without one, the mean of its tokens, after a LayerNorm.

  Attributes:
    image_size: the default resolution (any size works: no position embedding).
    num_classes: 0 returns the normalised pooled features.
  """
  num_classes: int = 1000
  image_size: int = 224
  hidden_sizes: Sequence[int] = (64, 192, 384)
  depths: Sequence[int] = (1, 2, 10)
  num_heads: Sequence[int] = (1, 3, 6)
  patch_sizes: Sequence[int] = (7, 3, 3)
  patch_strides: Sequence[int] = (4, 2, 2)
  patch_paddings: Sequence[int] = (2, 1, 1)
  cls_token: Sequence[bool] = (False, False, True)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    layers.check_per_stage(self, ("hidden_sizes", "num_heads", "patch_sizes",
                                  "patch_strides", "patch_paddings", "cls_token"),
                           len(self.depths))
    for dim, heads in zip(self.hidden_sizes, self.num_heads):
      if dim % heads:
        raise ValueError(f"CvT width {dim} is not divisible by its {heads} heads")
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    x, cls = images.astype(dtype), None
    for s, depth in enumerate(self.depths):
      start = sum(self.depths[:s])
      x, cls = Stage(
          hidden_size=self.hidden_sizes[s], num_layers=depth, num_heads=self.num_heads[s],
          patch_size=self.patch_sizes[s], patch_stride=self.patch_strides[s],
          patch_padding=self.patch_paddings[s],
          drop_path_rates=tuple(rates[start:start + depth]), mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias, with_cls_token=self.cls_token[s],
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, dtype=dtype,
          param_dtype=param_dtype, name=f"stage{s}")(x, train=train)
      self.sow("intermediates", f"stage_{s}", x)

    pooled = cls if cls is not None else x.reshape(x.shape[0], -1, x.shape[-1])
    x = layers.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name="norm")(
        pooled)
    if cls is None:
      x = jnp.mean(x, axis=1)
    return layers.classifier_head(self, x, self.num_classes, dtype=dtype,
                                  param_dtype=param_dtype)


# The official configurations (experiments/imagenet/cvt/*.yaml): CvT-13 and CvT-21 at
# 224 (ImageNet-1k), CvT-W24 at 384 (ImageNet-22k); every other setting is shared.
VARIANTS = {
    "13": (dict(hidden_sizes=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)), 224),
    "21": (dict(hidden_sizes=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6)), 224),
    "w24": (dict(hidden_sizes=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16)),
            384),
}


def _register_variants():
  for size, (dims, resolution) in VARIANTS.items():
    name = f"cvt_{size}"
    defaults = dict(dims, image_size=resolution)
    register_variant(name, CvT, defaults, family="cvt", image_size=resolution,
                     doc=f"CvT-{size.upper()} (default resolution {resolution}).")


_register_variants()
