"""EfficientViT (MIT; Cai et al., 2023): multi-scale ReLU linear attention.

"EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense Prediction".
A convolutional stem and four stages; the last two (B) or the last one (L) stack
EfficientViT blocks: a *LiteMLA* context module (1x1 conv to q/k/v, a multi-scale
aggregation by a depthwise 5x5 and a grouped 1x1 conv, ReLU linear attention per
head over all positions, 1x1 projection + BatchNorm) followed by an MBConv local
module, both residual. The head is a 1x1 conv, global average pooling, and an MLP
with LayerNorm. Matches timm's ``efficientvit_mit`` (``EfficientVit`` for b0-b3,
``EfficientVitLarge`` for l1-l3) number for number; parameter names follow timm's
module paths (``stages.2.blocks.1.context_module.main.qkv.conv`` is
``stages_2/blocks_1/context_module/main/qkv/conv``) so the converter is a renaming.

The linear attention goes through ``vit_jax.kernels.linear_attention``:
``attention_impl="pallas"`` runs the Pallas kernel. BatchNorm statistics live in
the ``batch_stats`` collection. Any input size works (all convolutions pad
symmetrically, as in timm); features are sown as ``stage_{i}`` (NHWC, strides
4/8/16/32... counting the stem: 4, 8, 16, 32) and ``features``.

Beyond timm: ``drop_path_rate`` adds stochastic depth on the residual blocks
(linear over depth); timm's model has none, and the default 0 is timm's behaviour.
"""

import functools
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import kernels, sharding
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, Variables, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any

# Tensor parallelism (see vit_jax.sharding). LiteMLA: the ``qkv`` conv writes its
# channels head by head ([head][q|k|v][head_dim]) and the aggregation convs keep
# that order, so splitting them splits heads; ``proj`` reads the heads back. The
# MBConv local module is the MLP: 1x1 expand, depthwise, 1x1 project.
PARAM_AXES = (
    (r"context_module/main/qkv/conv/kernel$", (None, None, "embed", "heads")),
    (r"context_module/main/aggreg_\d+_\d+/kernel$", (None, None, None, "heads")),
    (r"context_module/main/proj/conv/kernel$", (None, None, "heads", "embed")),
    (r"local_module/main/inverted_conv/conv/kernel$", (None, None, "embed", "mlp")),
    (r"local_module/main/(inverted|depth)_conv/(conv/bias|norm/(scale|bias|mean|var))$",
     ("mlp",)),
    (r"local_module/main/depth_conv/conv/kernel$", (None, None, None, "mlp")),
    (r"local_module/main/point_conv/conv/kernel$", (None, None, "mlp", "embed")),
)
sharding.register_param_axes(PARAM_AXES)

# timm efficientvit_mit configurations: stem + 4 stage widths/depths, head dim of
# the linear attention, head MLP widths.
VARIANTS = {
    "b0": dict(widths=(8, 16, 32, 64, 128), depths=(1, 2, 2, 2, 2), head_dim=16,
               head_widths=(1024, 1280)),
    "b1": dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), head_dim=16,
               head_widths=(1536, 1600)),
    "b2": dict(widths=(24, 48, 96, 192, 384), depths=(1, 3, 4, 4, 6), head_dim=32,
               head_widths=(2304, 2560)),
    "b3": dict(widths=(32, 64, 128, 256, 512), depths=(1, 4, 6, 6, 9), head_dim=32,
               head_widths=(2304, 2560)),
    "l1": dict(widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 6), head_dim=32,
               head_widths=(3072, 3200), large=True),
    "l2": dict(widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 8, 8), head_dim=32,
               head_widths=(3072, 3200), large=True),
    "l3": dict(widths=(64, 128, 256, 512, 1024), depths=(1, 2, 2, 8, 8), head_dim=32,
               head_widths=(6144, 6400), large=True),
}


def _activation(name: Optional[str]):
  if name is None:
    return lambda x: x
  return {"hardswish": jax.nn.hard_swish,
          "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
          "relu": jax.nn.relu}[name]


class ConvNormAct(nn.Module):
  """Conv (symmetric padding k//2) -> optional BatchNorm -> optional activation."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  use_bias: bool = False
  norm: bool = True
  act: Optional[str] = None
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    pad = self.kernel_size // 2
    x = layers.grouped_conv(self.features, self.kernel_size, x.shape[-1], self.groups,
                            strides=(self.stride, self.stride),
                            padding=((pad, pad), (pad, pad)), use_bias=self.use_bias,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    if self.norm:
      x = layers.batch_norm(train, epsilon=self.norm_eps, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="norm")(x)
    return _activation(self.act)(x)


def _flags(value, n):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class DSConv(nn.Module):
  """Depthwise 3x3 -> pointwise 1x1 (timm ``DSConv``)."""
  features: int
  stride: int = 1
  use_bias: Any = False
  norm: Any = True
  act: Any = ("hardswish", None)
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    bias, norm, act = _flags(self.use_bias, 2), _flags(self.norm, 2), _flags(self.act, 2)
    kw = dict(norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvNormAct(x.shape[-1], 3, self.stride, groups=x.shape[-1], use_bias=bias[0],
                    norm=norm[0], act=act[0], name="depth_conv", **kw)(x, train=train)
    return ConvNormAct(self.features, 1, use_bias=bias[1], norm=norm[1], act=act[1],
                       name="point_conv", **kw)(x, train=train)


class ConvBlock(nn.Module):
  """3x3 (stride) -> 3x3 (timm ``ConvBlock``, expand ratio 1 in the large stem)."""
  features: int
  stride: int = 1
  use_bias: Any = False
  norm: Any = True
  act: Any = ("hardswish", None)
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    bias, norm, act = _flags(self.use_bias, 2), _flags(self.norm, 2), _flags(self.act, 2)
    kw = dict(norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvNormAct(x.shape[-1], 3, self.stride, use_bias=bias[0], norm=norm[0],
                    act=act[0], name="conv1", **kw)(x, train=train)
    return ConvNormAct(self.features, 3, use_bias=bias[1], norm=norm[1], act=act[1],
                       name="conv2", **kw)(x, train=train)


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand -> depthwise 3x3 (stride) -> 1x1 project."""
  features: int
  expand_ratio: float = 4.0
  stride: int = 1
  use_bias: Any = False
  norm: Any = True
  act: Any = ("hardswish", "hardswish", None)
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    bias, norm, act = _flags(self.use_bias, 3), _flags(self.norm, 3), _flags(self.act, 3)
    mid = round(x.shape[-1] * self.expand_ratio)
    kw = dict(norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvNormAct(mid, 1, use_bias=bias[0], norm=norm[0], act=act[0],
                    name="inverted_conv", **kw)(x, train=train)
    x = ConvNormAct(mid, 3, self.stride, groups=mid, use_bias=bias[1], norm=norm[1],
                    act=act[1], name="depth_conv", **kw)(x, train=train)
    return ConvNormAct(self.features, 1, use_bias=bias[2], norm=norm[2], act=act[2],
                       name="point_conv", **kw)(x, train=train)


class FusedMBConv(nn.Module):
  """Fused inverted residual: full 3x3 expand (stride) -> 1x1 project."""
  features: int
  expand_ratio: float = 4.0
  stride: int = 1
  use_bias: Any = False
  norm: Any = True
  act: Any = ("gelu_tanh", None)
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    bias, norm, act = _flags(self.use_bias, 2), _flags(self.norm, 2), _flags(self.act, 2)
    mid = round(x.shape[-1] * self.expand_ratio)
    kw = dict(norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvNormAct(mid, 3, self.stride, use_bias=bias[0], norm=norm[0], act=act[0],
                    name="spatial_conv", **kw)(x, train=train)
    return ConvNormAct(self.features, 1, use_bias=bias[1], norm=norm[1], act=act[1],
                       name="point_conv", **kw)(x, train=train)


class LiteMLA(nn.Module):
  """Lightweight multi-scale linear attention (ReLU kernel, eps 1e-5)."""
  features: int
  head_dim: int = 32
  scales: Sequence[int] = (5,)
  eps: float = 1e-5
  norm_eps: float = 1e-5
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    batch, height, width, channels = x.shape
    heads = channels // self.head_dim
    total = heads * self.head_dim
    conv = lambda features, k, groups, name: layers.grouped_conv(
        features, k, 3 * total, groups, padding=((k // 2, k // 2),) * 2,
        use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    qkv = ConvNormAct(3 * total, 1, norm=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="qkv")(x, train=train)
    # Each scale: depthwise k x k, then a 1x1 conv grouped per (q|k|v, head).
    multi = [qkv] + [conv(3 * total, 1, 3 * heads, f"aggreg_{i}_1")(
        conv(3 * total, s, 3 * total, f"aggreg_{i}_0")(qkv))
                     for i, s in enumerate(self.scales)]
    multi = jnp.concatenate(multi, axis=-1)
    # Channels come as [head][q|k|v][head_dim] blocks, as timm's reshape reads them.
    multi = multi.reshape(batch, height * width, -1, 3 * self.head_dim)
    q, k, v = jnp.split(multi, 3, axis=-1)
    out = kernels.linear_attention(q, k, v, feature_map="relu", normalize=True,
                                   eps=self.eps, impl=self.attention_impl)
    out = out.reshape(batch, height, width, -1)
    return ConvNormAct(self.features, 1, norm_eps=self.norm_eps, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="proj")(out, train=train)


class Residual(nn.Module):
  """``main(x) (+ x)``; the wrapped module is the child ``main`` (timm's layout).

  ``main`` is a module factory (a class or ``functools.partial``): built here, so
  that it is this module's child.
  """
  main: Callable[..., nn.Module]
  shortcut: bool = True
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train=False):
    y = self.main(name="main")(x, train=train)
    if not self.shortcut:
      return y
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class EfficientVitBlock(nn.Module):
  """LiteMLA context module + MBConv local module, both residual."""
  head_dim: int
  expand_ratio: float
  act: str
  norm_eps: float
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    x = Residual(functools.partial(LiteMLA, channels, self.head_dim,
                                   norm_eps=self.norm_eps,
                                   attention_impl=self.attention_impl, **kw),
                 drop_path_rate=self.drop_path_rate, name="context_module")(x, train=train)
    local = functools.partial(MBConv, channels, self.expand_ratio,
                              use_bias=(True, True, False), norm=(False, False, True),
                              act=(self.act, self.act, None), norm_eps=self.norm_eps, **kw)
    return Residual(local, drop_path_rate=self.drop_path_rate, name="local_module")(
        x, train=train)


def _local_block(features: int, stride: int, expand_ratio: float, act: str,
                 norm_eps: float, fewer_norm: bool, fused: bool,
                 kw: dict) -> Callable[..., nn.Module]:
  """timm ``build_local_block``: (DS|Conv)Block at ratio 1, (Fused)MBConv otherwise.

  Returns the module's factory (see ``Residual``).
  """
  common = dict(features=features, stride=stride, norm_eps=norm_eps, **kw)
  if expand_ratio == 1:
    return functools.partial(ConvBlock if fused else DSConv,
                             use_bias=(True, False) if fewer_norm else False,
                             norm=(False, True) if fewer_norm else True,
                             act=(act, None), **common)
  if fused:
    return functools.partial(FusedMBConv, expand_ratio=expand_ratio,
                             use_bias=(True, False) if fewer_norm else False,
                             norm=(False, True) if fewer_norm else True,
                             act=(act, None), **common)
  return functools.partial(MBConv, expand_ratio=expand_ratio,
                           use_bias=(True, True, False) if fewer_norm else False,
                           norm=(False, False, True) if fewer_norm else True,
                           act=(act, act, None), **common)


class _Stem(nn.Module):
  """3x3 stride-2 conv, then ``depth`` residual DSConv (B) or ConvBlock (L) blocks."""
  features: int
  depth: int
  act: str
  norm_eps: float
  large: bool
  rates: Sequence[float]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvNormAct(self.features, 3, 2, act=self.act, norm_eps=self.norm_eps,
                    name="in_conv", **kw)(x, train=train)
    for j in range(self.depth):
      block = _local_block(self.features, 1, 1, self.act, self.norm_eps,
                           fewer_norm=False, fused=self.large, kw=kw)
      x = Residual(block, drop_path_rate=self.rates[j], name=f"res{j}")(x, train=train)
    return x


class _Stage(nn.Module):
  """A stride-2 local block, then local blocks or EfficientViT blocks (``blocks_{j}``)."""
  index: int
  features: int
  depth: int
  large: bool
  expand_ratio: float
  head_dim: int
  act: str
  norm_eps: float
  rates: Sequence[float]
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act, eps, i = self.act, self.norm_eps, self.index
    if self.large:  # timm EfficientVitLargeStage
      vit_stage, fewer_norm = i >= 3, i >= 2
      first = _local_block(self.features, 2, 24 if vit_stage else 16, act, eps,
                           fewer_norm=vit_stage or fewer_norm, fused=not fewer_norm,
                           kw=kw)
    else:  # timm EfficientVitStage
      vit_stage = i >= 2
      first = _local_block(self.features, 2, self.expand_ratio, act, eps,
                           fewer_norm=vit_stage, fused=False, kw=kw)
    x = Residual(first, shortcut=False, name="blocks_0")(x, train=train)
    for j, rate in enumerate(self.rates):
      name = f"blocks_{j + 1}"
      if vit_stage:
        x = EfficientVitBlock(self.head_dim, 6.0 if self.large else self.expand_ratio,
                              act, eps, drop_path_rate=rate,
                              attention_impl=self.attention_impl, name=name, **kw)(
                                  x, train=train)
      else:
        if self.large:
          local = _local_block(self.features, 1, 4.0, act, eps, fewer_norm=fewer_norm,
                               fused=not fewer_norm, kw=kw)
        else:
          local = _local_block(self.features, 1, self.expand_ratio, act, eps,
                               fewer_norm=False, fused=False, kw=kw)
        x = Residual(local, drop_path_rate=rate, name=name)(x, train=train)
    return x


class _Head(nn.Module):
  """1x1 conv (BatchNorm eps 1e-5 in both layouts, as timm) -> pool -> MLP.

  Returns ``(pre-logits features, logits)`` (features twice when headless).
  """
  widths: Sequence[int]
  num_classes: int
  act: str
  norm_eps: float
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ConvNormAct(self.widths[0], 1, act=self.act, name="in_conv", **kw)(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Dense(self.widths[1], use_bias=False, name="classifier_0", **kw)(x)
    x = layers.LayerNorm(epsilon=self.norm_eps, use_fast_variance=False, name="classifier_1",
                     **kw)(x)
    features = _activation(self.act)(x)
    if not self.num_classes:
      return features, features
    x = nn.Dropout(self.dropout_rate)(features, deterministic=not train)
    return features, layers.Dense(self.num_classes, name="classifier_4", **kw)(x)


class EfficientViT(nn.Module):
  """EfficientViT-B (``large=False``) or -L. NHWC images in, float32 logits out.

  Attributes:
    widths, depths: stem and four stages (timm's ``widths``/``depths``).
    head_dim: linear-attention head dim; ``head_widths``: head conv and MLP widths.
    large: the L layout (ConvBlock stem, fused MBConvs in stages 1-2, attention in
      stage 4 only, GELU-tanh, BatchNorm and LayerNorm eps 1e-7).
    num_classes: 0 returns the pooled pre-logits features (timm's convention).
    attention_impl: "xla" | "pallas" | "auto" for the linear attention.
  """
  widths: Sequence[int] = (8, 16, 32, 64, 128)
  depths: Sequence[int] = (1, 2, 2, 2, 2)
  head_dim: int = 16
  head_widths: Sequence[int] = (1024, 1280)
  large: bool = False
  expand_ratio: float = 4.0
  num_classes: int = 1000
  image_size: int = 224  # the default resolution; any size works
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    layers.check_images(images)
    layers.check_per_stage(self, ("widths", "depths"), 5)  # the stem and four stages
    kernels.resolve(self.attention_impl, "linear")  # a clear error for a bad name
    dtype = layers.canonical_dtype(self.dtype)
    kw = dict(dtype=dtype, param_dtype=layers.canonical_dtype(self.param_dtype))
    act = "gelu_tanh" if self.large else "hardswish"
    eps = 1e-7 if self.large else 1e-5

    # Stochastic depth over the residual blocks that keep their input.
    stage_blocks = [d if (self.large or i >= 2) else d - 1
                    for i, d in enumerate(self.depths[1:])]
    rates = layers.stochastic_depth_rates(self.drop_path_rate,
                                          self.depths[0] + sum(stage_blocks))
    x = _Stem(self.widths[0], self.depths[0], act, eps, self.large,
              tuple(rates[:self.depths[0]]), name="stem", **kw)(
                  images.astype(dtype), train=train)
    used = self.depths[0]
    for i, width in enumerate(self.widths[1:]):
      x = _Stage(i, width, self.depths[i + 1], self.large, self.expand_ratio,
                 self.head_dim, act, eps, tuple(rates[used:used + stage_blocks[i]]),
                 attention_impl=self.attention_impl, name=f"stages_{i}", **kw)(
                     x, train=train)
      used += stage_blocks[i]
      self.sow("intermediates", f"stage_{i}", x)
    features, x = _Head(self.head_widths, self.num_classes, act, eps, self.dropout_rate,
                        name="head", **kw)(x, train=train)
    self.sow("intermediates", "features", features)
    return x.astype(jnp.float32)


def _timm_key(path: tuple[str, ...]) -> str:
  """``("stages_2", "blocks_1", ..., "conv")`` -> ``"stages.2.blocks.1....conv"``."""
  return ".".join(re.sub(r"_(\d+)", r".\1", part) for part in path)


@register_timm_converter("efficientvit_mit")
def convert_timm_efficientvit(state: StateDict, model: EfficientViT) -> Variables:
  """timm ``efficientvit_mit`` state dict -> ``{"params", "batch_stats"}``.

  Our module paths are timm's with ``.N`` written ``_N``; layouts: conv OIHW -> HWIO
  (grouped and depthwise alike), Linear transposed, norms' weight -> scale,
  BatchNorm running_mean/var -> batch_stats mean/var.
  """
  size = model.image_size
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  state.skip(lambda k: k.endswith("num_batches_tracked"))
  out = {"params": {}, "batch_stats": {}}

  def put(tree, path, value):
    for part in path[:-1]:
      tree = tree.setdefault(part, {})
    tree[path[-1]] = value

  for collection in ("params", "batch_stats"):
    leaves = jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]
    for key_path, leaf in leaves:
      path = tuple(k.key for k in key_path)
      module, leaf_name = _timm_key(path[:-1]), path[-1]
      if collection == "batch_stats":
        value = state.take(f"{module}.running_{leaf_name}")
      elif leaf_name == "kernel":
        weight = state.take(f"{module}.weight")
        value = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
      elif leaf_name == "scale":
        value = state.take(f"{module}.weight")
      else:
        value = state.take(f"{module}.{leaf_name}")
      put(out[collection], path, value)
  return Variables(out)


def _register_variants():
  for size, config in VARIANTS.items():
    name = f"efficientvit_{size}"
    register_variant(name, EfficientViT, config, family="efficientvit_mit", image_size=224,
                     doc=f"EfficientViT-{size.upper()} (MIT), timm ``{name}``.")


_register_variants()
