"""MaxViT (Tu et al., 2022): MBConv + block attention + grid attention in every block.

Matches timm's ``maxxvit.MaxxVit`` with the ``maxvit_{tiny,small,base,large}_tf``
configurations, the ones timm built to follow the official TensorFlow code
(google-research/maxvit) and that carry its weights: MaxViT-T/S/B/L of the paper at
224 (30.92M / 68.93M / 119.47M / 211.79M parameters). Per block:

- MBConv: BatchNorm, 1x1 expansion (x4), BatchNorm+GELU, depthwise 3x3 (stride 2 in
  the first block of a stage), BatchNorm+GELU, squeeze-excitation (SiLU, 1/4 of the
  output width), 1x1 projection; the shortcut of a strided block is 2x2 average
  pooling plus a 1x1 convolution when the width changes.
- Block attention: attention inside non-overlapping ``P x P`` windows.
- Grid attention: attention across a ``P x P`` grid of positions strided ``H/P``
  apart, so that every window spans the whole map.

Both attentions go through ``vit_jax.kernels.window_attention`` (``mode="block"`` and
``mode="grid"``) with the TF-style relative position bias (a ``[heads, 2P-1, 2P-1]``
table indexed by key-minus-query offsets); ``attention_impl`` selects the
implementation. GELU is the tanh approximation and convolutions use TF "SAME"
padding, as in the official code. The head is average pooling, LayerNorm, a tanh
pre-logits layer and the classifier.

Resolution: the partition size ``P`` (``window_size``) defaults to ``image_size // 32``
(7 at 224), as in timm. Every stage map (``ceil(H/4)`` ... ``ceil(H/32)``, same for
W) must be divisible by ``P``; other inputs are a ValueError naming the constraint
(padding would change what grid attention mixes, so it is not done silently).
Create the model with another ``image_size`` (or ``window_size``) to change ``P``.

Parameter tree (``batch_stats`` mirrors every BatchNorm)::

  stem/{conv1, norm1, conv2}
  stages_{i}/blocks_{j}/conv/{shortcut_expand, pre_norm, conv1_1x1, norm1, conv2_kxk,
                              norm2, se/{fc1, fc2}, conv3_1x1}
  stages_{i}/blocks_{j}/attn_block|attn_grid/{norm1, attn/{query,key,value,out},
                              relative_position_bias/relative_position_bias_table,
                              norm2, mlp/Dense_{0,1}}
  head_norm, pre_logits, head

Intermediates: ``stage_{i}`` (NHWC output of stage ``i``; timm's
``forward_intermediates`` index ``i + 1``, index 0 being the stem) and ``features``.
"""

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import kernels
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, Variables, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any

BN_EPS = 1e-3  # the TF models' BatchNorm epsilon
LN_EPS = 1e-5


def _gelu(x: Array) -> Array:
  return nn.gelu(x, approximate=True)


def batch_norm(name: str, train: bool, **kw) -> nn.BatchNorm:
  """The shared BatchNorm with the TF models' epsilon (``batch_stats``)."""
  return layers.batch_norm(train, epsilon=BN_EPS, name=name, **kw)


class MBConv(nn.Module):
  """Pre-norm inverted bottleneck with squeeze-excitation (timm ``MbConvBlock``)."""
  out_dim: int
  stride: int = 1
  expand_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_dim = x.shape[-1]
    mid = layers.make_divisible(self.out_dim * self.expand_ratio)
    shortcut = x
    if self.stride == 2:
      shortcut = nn.avg_pool(shortcut, (2, 2), strides=(2, 2), padding="SAME")
      if in_dim != self.out_dim:
        shortcut = layers.Conv(self.out_dim, (1, 1), name="shortcut_expand", **kw)(shortcut)
    x = batch_norm("pre_norm", train, **kw)(x)
    x = layers.Conv(mid, (1, 1), use_bias=False, name="conv1_1x1", **kw)(x)
    x = _gelu(batch_norm("norm1", train, **kw)(x))
    x = layers.DepthwiseConv(mid, (3, 3), strides=(self.stride, self.stride), padding="SAME",
                             use_bias=False, name="conv2_kxk", **kw)(x)
    x = _gelu(batch_norm("norm2", train, **kw)(x))
    x = layers.SqueezeExcite(rd_channels=int(0.25 * self.out_dim), act=nn.silu,
                             conv_kernels=True, name="se", **kw)(x)
    x = layers.Conv(self.out_dim, (1, 1), name="conv3_1x1", **kw)(x)
    return layers.DropPath(self.drop_path_rate)(x, train=train) + shortcut


class PartitionAttention(nn.Module):
  """Pre-norm block (``mode="block"``) or grid attention, then a pre-norm MLP."""
  mode: str
  window: tuple[int, int]
  dim_head: int = 32
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    if dim % self.dim_head:
      raise ValueError(f"MaxViT width {dim} is not a multiple of dim_head={self.dim_head}")
    heads = dim // self.dim_head
    norm = lambda name: layers.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    bias = layers.RelativePositionBias(self.window, heads, self.param_dtype, layout="tf",
                                       name="relative_position_bias")()
    attention_fn = functools.partial(kernels.window_attention, window=self.window,
                                     mode=self.mode, impl=self.attention_impl)
    y = layers.MultiHeadDotProductAttention(
        num_heads=heads, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_fn=attention_fn, name="attn")(norm("norm1")(x), bias=bias)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    y = layers.MlpBlock(mlp_dim=4 * dim, gelu_approximate=True, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x))
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class MaxViTBlock(nn.Module):
  """MBConv, block attention, grid attention (one drop-path rate for all three)."""
  out_dim: int
  window: tuple[int, int]
  stride: int = 1
  dim_head: int = 32
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = MBConv(self.out_dim, stride=self.stride, drop_path_rate=self.drop_path_rate,
               name="conv", **kw)(x, train=train)
    for mode in ("block", "grid"):
      x = PartitionAttention(mode=mode, window=self.window, dim_head=self.dim_head,
                             drop_path_rate=self.drop_path_rate,
                             attention_impl=self.attention_impl, name=f"attn_{mode}",
                             **kw)(x, train=train)
    return x


class MaxViTStage(nn.Module):
  out_dim: int
  depth: int
  window: tuple[int, int]
  drop_path_rates: Sequence[float]
  dim_head: int = 32
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    for j in range(self.depth):
      x = MaxViTBlock(self.out_dim, self.window, stride=2 if j == 0 else 1,
                      dim_head=self.dim_head, drop_path_rate=self.drop_path_rates[j],
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"blocks_{j}")(x, train=train)
    return x


class MaxViT(nn.Module):
  """MaxViT classifier. Call with NHWC images; returns float32 logits.

  Attributes:
    num_classes: size of the head; 0 returns the pooled pre-logits features.
    image_size: default resolution; sets ``window_size`` when that is None.
    window_size: block-window and grid size ``P`` (None: ``image_size // 32``).
    embed_dims, depths: width and number of blocks of the four stages.
    stem_width: width of the two 3x3 stem convolutions.
    head_hidden_size: width of the tanh pre-logits layer.
    dim_head: attention head width (heads = width / dim_head).
    drop_path_rate: stochastic depth at the last block, linear from 0 over blocks.
    attention_impl: implementation of ``vit_jax.kernels.window_attention``.
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  window_size: Optional[Union[int, Sequence[int]]] = None
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 5, 2)
  stem_width: int = 64
  head_hidden_size: int = 512
  dim_head: int = 32
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def partition(self) -> tuple[int, int]:
    if self.window_size is not None:
      return layers.to_2tuple(self.window_size)
    return tuple(s // 32 for s in layers.to_2tuple(self.image_size))

  def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
    """Each stage's map for an input size, or a ValueError naming the constraint."""
    window = self.partition()
    sizes, size = [], (height, width)
    size = tuple(math.ceil(s / 2) for s in size)  # stem
    for _ in self.depths:
      size = tuple(math.ceil(s / 2) for s in size)
      sizes.append(size)
    bad = [s for s in sizes if s[0] % window[0] or s[1] % window[1]]
    if bad:
      listed = ", ".join(f"{h}x{w}" for h, w in sizes)
      raise ValueError(
          f"MaxViT with {window[0]}x{window[1]} block/grid partitions needs every stage "
          f"map to be divisible by {window[0]}x{window[1]}; a {height}x{width} input "
          f"gives stage maps {listed}. Use sides that are multiples of "
          f"{32 * window[0]}x{32 * window[1]}, or create the model with "
          "image_size=(H, W) (partition H//32) or another window_size.")
    return sizes

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    layers.check_images(images)
    layers.check_per_stage(self, ("embed_dims",), len(self.depths))
    self.stage_sizes(images.shape[1], images.shape[2])
    window = self.partition()

    x = _Stem(self.stem_width, name="stem", **kw)(images.astype(dtype), train=train)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    for i, (dim, depth) in enumerate(zip(self.embed_dims, self.depths)):
      start = sum(self.depths[:i])
      x = MaxViTStage(dim, depth, window, rates[start:start + depth],
                      dim_head=self.dim_head, attention_impl=self.attention_impl,
                      name=f"stages_{i}", **kw)(x, train=train)
      self.sow("intermediates", f"stage_{i}", x)

    # timm's NormMlpClassifierHead: average pool, LayerNorm, tanh pre-logits layer.
    x = layers.LayerNorm(epsilon=LN_EPS, name="head_norm", **kw)(jnp.mean(x, axis=(1, 2)))
    x = jnp.tanh(layers.Dense(self.head_hidden_size, name="pre_logits", **kw)(x))
    return layers.classifier_head(self, x, self.num_classes,
                                  kernel_init=layers.head_init(self.head_zeroinit), **kw)


class _Stem(nn.Module):
  """3x3 stride-2 conv, BatchNorm+GELU, 3x3 conv (both with bias, TF SAME padding)."""
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.width, (3, 3), strides=(2, 2), padding="SAME", name="conv1", **kw)(x)
    x = _gelu(batch_norm("norm1", train, **kw)(x))
    return nn.Conv(self.width, (3, 3), padding="SAME", name="conv2", **kw)(x)


def _timm_batch_norm(state: StateDict, prefix: str, params: dict, stats: dict,
                     name: str) -> None:
  params[name] = state.norm(prefix)
  stats[name] = {"mean": state.take(f"{prefix}.running_mean"),
                 "var": state.take(f"{prefix}.running_var")}


@register_timm_converter("maxvit")
def convert_timm_maxvit(state: StateDict, model: MaxViT) -> dict:
  """timm ``MaxxVit`` (``maxvit_*_tf_*``) state dict -> ``{"params", "batch_stats"}``."""
  state.skip(lambda k: k.endswith(("num_batches_tracked", "height_lookup",
                                   "width_lookup")))
  params, stats = {}, {}
  stem, stem_stats = {"conv1": state.conv("stem.conv1"),
                      "conv2": state.conv("stem.conv2")}, {}
  _timm_batch_norm(state, "stem.norm1", stem, stem_stats, "norm1")
  params["stem"], stats["stem"] = stem, stem_stats
  for i, depth in enumerate(model.depths):
    stage, stage_stats = {}, {}
    for j in range(depth):
      prefix = f"stages.{i}.blocks.{j}"
      conv, conv_stats = {}, {}
      if f"{prefix}.conv.shortcut.expand.weight" in state:
        conv["shortcut_expand"] = state.conv(f"{prefix}.conv.shortcut.expand")
      for name in ("pre_norm", "norm1", "norm2"):
        _timm_batch_norm(state, f"{prefix}.conv.{name}", conv, conv_stats, name)
      conv["conv1_1x1"] = state.conv(f"{prefix}.conv.conv1_1x1", bias=False)
      conv["conv2_kxk"] = state.conv(f"{prefix}.conv.conv2_kxk", bias=False)
      conv["se"] = {"fc1": state.conv(f"{prefix}.conv.se.fc1"),
                    "fc2": state.conv(f"{prefix}.conv.se.fc2")}
      conv["conv3_1x1"] = state.conv(f"{prefix}.conv.conv3_1x1")
      block = {"conv": conv}
      for mode in ("block", "grid"):
        attn = f"{prefix}.attn_{mode}"
        heads = state.take(f"{attn}.attn.rel_pos.relative_position_bias_table").shape[0]
        block[f"attn_{mode}"] = {
            "norm1": state.norm(f"{attn}.norm1"),
            "attn": layers.timm_attention_params(state, f"{attn}.attn", heads),
            "relative_position_bias": {"relative_position_bias_table": state.take(
                f"{attn}.attn.rel_pos.relative_position_bias_table")},
            "norm2": state.norm(f"{attn}.norm2"),
            "mlp": layers.timm_mlp_params(state, f"{attn}.mlp"),
        }
      stage[f"blocks_{j}"] = block
      stage_stats[f"blocks_{j}"] = {"conv": conv_stats}
    params[f"stages_{i}"], stats[f"stages_{i}"] = stage, stage_stats
  params["head_norm"] = state.norm("head.norm")
  params["pre_logits"] = state.linear("head.pre_logits.fc")
  if model.num_classes:
    params["head"] = state.linear("head.fc")
  return Variables(params=params, batch_stats=stats)


# timm's maxvit_*_tf_224 (the official TF configurations):
# (embed_dims, depths, stem_width, head_hidden_size).
VARIANTS = {
    "maxvit_tiny_tf_224": ((64, 128, 256, 512), (2, 2, 5, 2), 64, 512),
    "maxvit_small_tf_224": ((96, 192, 384, 768), (2, 2, 5, 2), 64, 768),
    "maxvit_base_tf_224": ((96, 192, 384, 768), (2, 6, 14, 2), 64, 768),
    "maxvit_large_tf_224": ((128, 256, 512, 1024), (2, 6, 14, 2), 128, 1024),
}


def _register_variants():
  for name, (dims, depths, stem, hidden) in VARIANTS.items():
    defaults = dict(embed_dims=dims, depths=depths, stem_width=stem,
                    head_hidden_size=hidden, image_size=224)
    register_variant(name, MaxViT, defaults, family="maxvit", image_size=224,
                     doc=f"MaxViT {name} (timm, official TF configuration).")


_register_variants()
