"""MetaFormer family: PoolFormer (v1, v2), ConvFormer and CAFormer.

One MetaFormer block, ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` with optional
layer scale and residual scale, and pluggable token mixers:

  pooling    PoolFormer: 3x3 average pooling (padding not counted) minus the input
  sepconv    ConvFormer: inverted separable conv, 1x1 -> StarReLU -> 7x7 depthwise -> 1x1
  attention  CAFormer's last two stages: softmax self-attention with 32-wide heads

Papers: "MetaFormer Is Actually What You Need for Vision" (Yu et al., 2022) and
"MetaFormer Baselines for Vision" (Yu et al., 2023). Numerically this matches timm's
``timm.models.metaformer`` (checked with random weights; tests/test_metaformer.py).

Parameter layout (NHWC throughout; attention stages flatten to tokens in the mixer)::

  stem_conv, stem_norm                          7x7 stride-4 conv, optional norm
  stages_{i}_downsample_{norm,conv}             3x3 stride-2 conv where the width changes
  stages_{i}_blocks_{j}/norm1, token_mixer, layer_scale1, res_scale1,
                        norm2, mlp/{fc1,act,fc2}, layer_scale2, res_scale2
  head_norm                                     LayerNorm after global average pooling
  head or head/{fc1,norm,fc2}                   linear head, or the MLP head of
                                                ConvFormer and CAFormer

Each stage's output is sown as ``stage_{i}`` (NHWC) and the pooled, normalised head
input as ``features``.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import sharding
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any

_init = nn.initializers.truncated_normal(stddev=0.02)  # timm: trunc_normal_(std=.02)

# Tensor parallelism (see vit_jax.sharding): the block MLP's ``fc1``/``fc2`` and
# ConvFormer's separable-conv mixer (pointwise expand, depthwise, pointwise project:
# an MLP with a depthwise conv inside) split their hidden units over ``mlp``, so each
# ends in one all-reduce. CAFormer's attention is the shared layer (built-in rules).
PARAM_AXES = (
    (r"(^|/)mlp/fc1/kernel$", ("embed", "mlp")),
    (r"(^|/)mlp/fc1/bias$", ("mlp",)),
    (r"(^|/)mlp/fc2/kernel$", ("mlp", "embed")),
    (r"(^|/)token_mixer/pwconv1/kernel$", ("embed", "mlp")),
    (r"(^|/)token_mixer/dwconv/kernel$", (None, None, None, "mlp")),
    (r"(^|/)token_mixer/pwconv2/kernel$", ("mlp", "embed")),
)
sharding.register_param_axes(PARAM_AXES)


class StarReLU(nn.Module):
  """``scale * relu(x) ** 2 + bias`` with a learned scalar scale and bias."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (1,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (1,), self.param_dtype)
    y = scale.astype(self.dtype) * jnp.square(nn.relu(x)) + bias.astype(self.dtype)
    return layers.outside_product_fusion(y)  # relu's 0 would be written out at full size


def _activation(name: str, dtype, param_dtype):
  if name == "gelu":  # torch's nn.GELU is the exact (erf) GELU
    return layers.gelu
  if name == "star_relu":
    return StarReLU(dtype=dtype, param_dtype=param_dtype, name="act")
  raise ValueError(f"unknown MetaFormer activation {name!r}; use 'gelu' or 'star_relu'")


def _norm(kind: Optional[str], dtype, param_dtype, name: str):
  """The norms MetaFormers use, over NHWC maps (or [B, N, C] tokens).

  ``group``: GroupNorm with one group (statistics over H, W and C), bias, eps 1e-5
  (PoolFormer v1); ``group_nobias``: the same without bias and eps 1e-6 (PoolFormer
  v2); ``layer_nobias``: LayerNorm over channels, no bias, eps 1e-6 (ConvFormer,
  CAFormer); ``layer``: with bias. Two-pass variance, as torch computes it.
  """
  if kind is None:
    return lambda x: x
  if kind in ("group", "group_nobias"):
    return layers.GroupNorm(num_groups=1, epsilon=1e-5 if kind == "group" else 1e-6,
                        use_bias=kind == "group", use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype, name=name)
  if kind in ("layer", "layer_nobias"):
    return layers.LayerNorm(epsilon=1e-6, use_bias=kind == "layer", use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"unknown MetaFormer norm {kind!r}; use 'group', 'group_nobias', "
                   "'layer' or 'layer_nobias'")


class Pooling(nn.Module):
  """PoolFormer's mixer: 3x3 average pooling (padding excluded from the mean) minus x."""
  pool_size: int = 3

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    pad = self.pool_size // 2
    pooled = nn.avg_pool(x, (self.pool_size, self.pool_size), strides=(1, 1),
                         padding=((pad, pad), (pad, pad)), count_include_pad=False)
    # Flax divides by a float32 count: keep the compute dtype (bfloat16 stays bfloat16).
    return pooled.astype(x.dtype) - x


class SepConv(nn.Module):
  """ConvFormer's mixer: pointwise expand -> StarReLU -> 7x7 depthwise -> pointwise."""
  expansion_ratio: float = 2.0
  kernel_size: int = 7
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    mid = int(self.expansion_ratio * dim)
    kw = dict(use_bias=False, kernel_init=_init, dtype=self.dtype,
              param_dtype=self.param_dtype)
    x = layers.Dense(mid, name="pwconv1", **kw)(x)  # a 1x1 conv is a Dense over channels
    x = StarReLU(dtype=self.dtype, param_dtype=self.param_dtype, name="act1")(x)
    pad = self.kernel_size // 2
    x = layers.DepthwiseConv(mid, (self.kernel_size, self.kernel_size),
                             padding=((pad, pad), (pad, pad)), name="dwconv", **kw)(x)
    return layers.Dense(dim, name="pwconv2", **kw)(x)


class Attention(nn.Module):
  """CAFormer's mixer: self-attention over all H*W tokens, heads of width 32, no biases."""
  head_dim: int = 32
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    batch, height, width, dim = x.shape
    num_heads = max(dim // self.head_dim, 1)
    if num_heads * self.head_dim != dim:
      raise ValueError(f"CAFormer attention needs a width divisible by {self.head_dim}, "
                       f"got {dim}")
    tokens = x.reshape(batch, height * width, dim)
    tokens = layers.MultiHeadDotProductAttention(
        num_heads=num_heads, use_bias=False, kernel_init=_init, dtype=self.dtype,
        param_dtype=self.param_dtype, name="attn")(tokens, train=train)
    tokens = nn.Dropout(self.dropout_rate)(tokens, deterministic=not train)
    return tokens.reshape(batch, height, width, dim)


_MIXERS = {"pooling": Pooling, "sepconv": SepConv, "attention": Attention}


class Mlp(nn.Module):
  """Pointwise MLP: fc1 (4x) -> activation -> dropout -> fc2 -> dropout."""
  hidden_dim: int
  act: str = "star_relu"
  use_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    dense = lambda f, name: layers.Dense(f, use_bias=self.use_bias, kernel_init=_init,
                                         dtype=self.dtype, param_dtype=self.param_dtype,
                                         name=name)
    x = dense(self.hidden_dim, "fc1")(x)
    x = _activation(self.act, self.dtype, self.param_dtype)(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = dense(dim, "fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class MetaFormerBlock(nn.Module):
  """``x * res_scale + layer_scale * drop_path(mixer(norm(x)))``, then the same with MLP."""
  token_mixer: str = "pooling"
  norm: str = "layer_nobias"
  mlp_act: str = "star_relu"
  mlp_bias: bool = False
  layer_scale_init: Optional[float] = None
  res_scale_init: Optional[float] = None
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _scale(self, name: str, init: Optional[float], dim: int):
    if init is None:
      return lambda x: x
    scale = self.param(name, nn.initializers.constant(init), (dim,), self.param_dtype)
    return lambda x: x * scale.astype(x.dtype)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    if self.token_mixer not in _MIXERS:
      raise ValueError(f"unknown token mixer {self.token_mixer!r}; "
                       f"use one of {sorted(_MIXERS)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.token_mixer == "pooling":
      mixer = Pooling(name="token_mixer")
    elif self.token_mixer == "sepconv":
      mixer = SepConv(name="token_mixer", **kw)
    else:  # only attention projects with dropout, as in timm
      mixer = Attention(dropout_rate=self.dropout_rate, name="token_mixer", **kw)
    drop_path = layers.DropPath(self.drop_path_rate)

    y = mixer(_norm(self.norm, name="norm1", **kw)(x), train=train)
    x = (self._scale("res_scale1", self.res_scale_init, dim)(x)
         + self._scale("layer_scale1", self.layer_scale_init, dim)(drop_path(y, train=train)))
    y = Mlp(4 * dim, act=self.mlp_act, use_bias=self.mlp_bias,
            dropout_rate=self.dropout_rate, name="mlp", **kw)(
                _norm(self.norm, name="norm2", **kw)(x), train=train)
    return (self._scale("res_scale2", self.res_scale_init, dim)(x)
            + self._scale("layer_scale2", self.layer_scale_init, dim)(drop_path(y, train=train)))


class MlpHead(nn.Module):
  """ConvFormer/CAFormer head: fc1 (4x) -> squared ReLU -> LayerNorm -> fc2."""
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(kernel_init=_init, dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Dense(4 * x.shape[-1], name="fc1", **kw)(x)
    x = jnp.square(nn.relu(x))
    x = layers.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="norm")(x)
    return layers.Dense(self.num_classes, name="fc2", **kw)(x)


# Settings that take one value per stage, or one value for every stage.
PER_STAGE = ("token_mixers", "norms", "layer_scale_init", "res_scale_init")


class MetaFormer(nn.Module):
  """MetaFormer classifier. Call with NHWC images; returns float32 logits (or features).

  Attributes:
    depths, dims: blocks and width per stage. A stage downsamples (3x3 stride-2 conv)
      when its width differs from the previous one, as in timm.
    token_mixers: per stage (or one for all): "pooling", "sepconv" or "attention".
    norms: per-stage block norm, see ``_norm``; downsample_norm: stem and downsampling
      norm (None: no norm, PoolFormer v1).
    mlp_act: "gelu" or "star_relu"; mlp_bias: biases in the block MLPs.
    layer_scale_init, res_scale_init: per stage (or one for all) initial values of the
      layer scale and residual scale; None leaves them out.
    mlp_head: ConvFormer/CAFormer's MLP head instead of a linear one.
    num_classes: 0 returns the pooled, normalised features.
    dropout_rate: dropout in the blocks (timm's proj_drop_rate); head_dropout_rate:
      before the head (timm's drop_rate); drop_path_rate: stochastic depth at the last
      block, rising linearly from 0 over all blocks.
  """
  num_classes: int = 1000
  depths: Sequence[int] = (2, 2, 6, 2)
  dims: Sequence[int] = (64, 128, 320, 512)
  token_mixers: Any = "pooling"
  norms: Any = "layer_nobias"
  downsample_norm: Optional[str] = "layer_nobias"
  mlp_act: str = "star_relu"
  mlp_bias: bool = False
  layer_scale_init: Any = None
  res_scale_init: Any = (None, None, 1.0, 1.0)
  mlp_head: bool = True
  dropout_rate: float = 0.0
  head_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    layers.check_images(images)
    if min(images.shape[1:3]) < 3:
      raise ValueError("MetaFormer's 7x7 stride-4 stem (padding 2) needs image sides of "
                       f"at least 3 pixels; got {images.shape[1]}x{images.shape[2]}")
    num_stages = len(self.depths)
    layers.check_per_stage(self, ("dims",), num_stages)
    mixers, norms, layer_scales, res_scales = (
        layers.per_stage(self, field, num_stages) for field in PER_STAGE)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))

    x = nn.Conv(self.dims[0], (7, 7), strides=(4, 4), padding=((2, 2), (2, 2)),
                kernel_init=_init, name="stem_conv", **kw)(images.astype(dtype))
    x = _norm(self.downsample_norm, name="stem_norm", **kw)(x)
    block = 0
    for i in range(num_stages):
      prev_dim = self.dims[i - 1] if i else self.dims[0]
      if self.dims[i] != prev_dim:
        x = _norm(self.downsample_norm, name=f"stages_{i}_downsample_norm", **kw)(x)
        x = nn.Conv(self.dims[i], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    kernel_init=_init, name=f"stages_{i}_downsample_conv", **kw)(x)
      for j in range(self.depths[i]):
        x = MetaFormerBlock(
            token_mixer=mixers[i], norm=norms[i], mlp_act=self.mlp_act,
            mlp_bias=self.mlp_bias, layer_scale_init=layer_scales[i],
            res_scale_init=res_scales[i], dropout_rate=self.dropout_rate,
            drop_path_rate=rates[block], name=f"stages_{i}_blocks_{j}", **kw)(
                x, train=train)
        block += 1
      self.sow("intermediates", f"stage_{i}", x)

    x = jnp.mean(x, axis=(1, 2))
    x = layers.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="head_norm", **kw)(x)
    x = nn.Dropout(self.head_dropout_rate)(x, deterministic=not train)
    if self.mlp_head and self.num_classes:
      self.sow("intermediates", "features", x)
      return MlpHead(self.num_classes, name="head", **kw)(x, train=train).astype(jnp.float32)
    return layers.classifier_head(self, x, self.num_classes, kernel_init=_init, **kw)


# ---------------------------------------------------------------- variants (timm names)

_S12, _S24, _S36, _M48 = (2, 2, 6, 2), (4, 4, 12, 4), (6, 6, 18, 6), (8, 8, 24, 8)
_POOL_S_DIMS, _POOL_M_DIMS = (64, 128, 320, 512), (96, 192, 384, 768)
_FORMER_DEPTHS = {"s18": (3, 3, 9, 3), "s36": (3, 12, 18, 3), "m36": (3, 12, 18, 3),
                  "b36": (3, 12, 18, 3)}
_FORMER_DIMS = {"s18": (64, 128, 320, 512), "s36": (64, 128, 320, 512),
                "m36": (96, 192, 384, 576), "b36": (128, 256, 512, 768)}

# PoolFormer v1: GELU MLPs with biases, GroupNorm with bias, no norm in the stem or
# downsampling, layer scale (1e-5, or 1e-6 for the deeper ones), linear head.
_POOLFORMER_V1 = dict(token_mixers="pooling", norms="group", downsample_norm=None,
                      mlp_act="gelu", mlp_bias=True, res_scale_init=None, mlp_head=False)
# PoolFormer v2: StarReLU, bias-free GroupNorm, residual scale in stages 3-4.
_POOLFORMER_V2 = dict(token_mixers="pooling", norms="group_nobias", mlp_head=False)
VARIANTS = {
    "poolformer_s12": dict(_POOLFORMER_V1, depths=_S12, dims=_POOL_S_DIMS,
                           layer_scale_init=1e-5),
    "poolformer_s24": dict(_POOLFORMER_V1, depths=_S24, dims=_POOL_S_DIMS,
                           layer_scale_init=1e-5),
    "poolformer_s36": dict(_POOLFORMER_V1, depths=_S36, dims=_POOL_S_DIMS,
                           layer_scale_init=1e-6),
    "poolformer_m36": dict(_POOLFORMER_V1, depths=_S36, dims=_POOL_M_DIMS,
                           layer_scale_init=1e-6),
    "poolformer_m48": dict(_POOLFORMER_V1, depths=_M48, dims=_POOL_M_DIMS,
                           layer_scale_init=1e-6),
    "poolformerv2_s12": dict(_POOLFORMER_V2, depths=_S12, dims=_POOL_S_DIMS),
    "poolformerv2_s24": dict(_POOLFORMER_V2, depths=_S24, dims=_POOL_S_DIMS),
    "poolformerv2_s36": dict(_POOLFORMER_V2, depths=_S36, dims=_POOL_S_DIMS),
    "poolformerv2_m36": dict(_POOLFORMER_V2, depths=_S36, dims=_POOL_M_DIMS),
    "poolformerv2_m48": dict(_POOLFORMER_V2, depths=_M48, dims=_POOL_M_DIMS),
}
for _size in _FORMER_DEPTHS:
  VARIANTS[f"convformer_{_size}"] = dict(
      depths=_FORMER_DEPTHS[_size], dims=_FORMER_DIMS[_size], token_mixers="sepconv")
  VARIANTS[f"caformer_{_size}"] = dict(
      depths=_FORMER_DEPTHS[_size], dims=_FORMER_DIMS[_size],
      token_mixers=("sepconv", "sepconv", "attention", "attention"))


def _register_variants():
  for name, defaults in VARIANTS.items():
    register_variant(name, MetaFormer, defaults, family="metaformer", image_size=224,
                     doc=f"timm's {name} at 224x224.")


_register_variants()


# ---------------------------------------------------------------- timm conversion

def _pointwise(state: StateDict, prefix: str, bias: bool) -> dict:
  """A 1x1 conv ([out, in, 1, 1]) or Linear ([out, in]) -> Dense params."""
  weight = state.take(f"{prefix}.weight")
  out = {"kernel": weight.reshape(weight.shape[0], weight.shape[1]).T}
  if bias:
    out["bias"] = state.take(f"{prefix}.bias")
  return out


def _norm_params(state: StateDict, prefix: str, kind: Optional[str]) -> dict:
  out = {"scale": state.take(f"{prefix}.weight")}
  if kind in ("group", "layer"):
    out["bias"] = state.take(f"{prefix}.bias")
  return out


def _star_relu(state: StateDict, prefix: str) -> dict:
  return {"scale": state.take(f"{prefix}.scale"), "bias": state.take(f"{prefix}.bias")}


@register_timm_converter("metaformer")
def convert_timm_metaformer(state: StateDict, model: MetaFormer) -> dict:
  """timm ``MetaFormer`` state dict -> params (every entry is used)."""
  num_stages = len(model.depths)
  mixers, norms, layer_scales, res_scales = (
      layers.per_stage(model, field, num_stages) for field in PER_STAGE)
  params = {"stem_conv": state.conv("stem.conv")}
  if model.downsample_norm:
    params["stem_norm"] = _norm_params(state, "stem.norm", model.downsample_norm)
  for i in range(num_stages):
    stage = f"stages.{i}"
    if model.dims[i] != (model.dims[i - 1] if i else model.dims[0]):
      if model.downsample_norm:
        params[f"stages_{i}_downsample_norm"] = _norm_params(
            state, f"{stage}.downsample.norm", model.downsample_norm)
      params[f"stages_{i}_downsample_conv"] = state.conv(f"{stage}.downsample.conv")
    for j in range(model.depths[i]):
      src = f"{stage}.blocks.{j}"
      block = {"norm1": _norm_params(state, f"{src}.norm1", norms[i]),
               "norm2": _norm_params(state, f"{src}.norm2", norms[i])}
      if mixers[i] == "sepconv":
        block["token_mixer"] = {
            "pwconv1": _pointwise(state, f"{src}.token_mixer.pwconv1", False),
            "act1": _star_relu(state, f"{src}.token_mixer.act1"),
            "dwconv": state.conv(f"{src}.token_mixer.dwconv", bias=False),
            "pwconv2": _pointwise(state, f"{src}.token_mixer.pwconv2", False)}
      elif mixers[i] == "attention":
        block["token_mixer"] = {"attn": layers.timm_attention_params(
            state, f"{src}.token_mixer", model.dims[i] // 32, qkv_bias=False,
            out_bias=False)}
      mlp = {"fc1": _pointwise(state, f"{src}.mlp.fc1", model.mlp_bias),
             "fc2": _pointwise(state, f"{src}.mlp.fc2", model.mlp_bias)}
      if model.mlp_act == "star_relu":
        mlp["act"] = _star_relu(state, f"{src}.mlp.act")
      block["mlp"] = mlp
      for k in (1, 2):
        if layer_scales[i] is not None:
          block[f"layer_scale{k}"] = state.take(f"{src}.layer_scale{k}.scale")
        if res_scales[i] is not None:
          block[f"res_scale{k}"] = state.take(f"{src}.res_scale{k}.scale")
      params[f"stages_{i}_blocks_{j}"] = block
  params["head_norm"] = state.norm("head.norm")
  if model.num_classes:
    if model.mlp_head:
      params["head"] = {"fc1": state.linear("head.fc.fc1"),
                        "norm": state.norm("head.fc.norm"),
                        "fc2": state.linear("head.fc.fc2")}
    else:
      params["head"] = state.linear("head.fc")
  return params
