"""GC ViT (Hatamizadeh et al., 2023): local window attention alternating with global-query
attention, where the query comes from a pooled view of the whole stage.

Matches timm's ``gcvit.GlobalContextVit`` (``gcvit_xxtiny`` ... ``gcvit_base``, the
configurations of NVlabs/GCVit): a stem (3x3 stride-2 conv, then a
"fused MBConv" downsampler), four stages and average pooling into a linear head. Each
stage:

- downsamples (stages 1-3) with LayerNorm, a depthwise MBConv with squeeze-excitation,
  a 3x3 stride-2 conv and LayerNorm;
- builds its global query once: MBConv blocks and 3x3 stride-2 max pooling until the
  map is the size of one attention window;
- runs blocks that alternate local window attention (even blocks: query, key and value
  from the window) and global-query attention (odd blocks: key and value from the
  window, the query is the stage's global query, the same for every window), each
  with a Swin-style relative position bias, an MLP and optional layer scale;
- the last stage ends with a LayerNorm.

Both kinds of attention go through ``vit_jax.kernels.window_attention``
(``mode="block"``): the global query fits that interface by tiling it over the
windows, since every window uses the same query. ``attention_impl`` selects the
implementation.

Resolution: windows are ``image_size // (32, 32, 16, 32)`` per stage (7, 7, 14, 7 at
224), and the number of pooling steps that bring a stage's map down to its window is
part of the architecture, so a model takes exactly its ``image_size``; another input
size is a ValueError. Create the model with ``image_size=(H, W)`` for another
resolution (sides that are multiples of 32 keep every map divisible by its window).

Parameter tree::

  stem_conv1, stem_down/{norm1, conv_block/{conv_dw, se_fc1, se_fc2, conv_pw},
                         reduction, norm2}
  stages_{i}/downsample/...                               (i > 0, as stem_down)
  stages_{i}/global_block_{k}/...                         (MBConv, as conv_block)
  stages_{i}/blocks_{j}/norm1, attn/{query (local only), key, value, out},
                        relative_position_bias/relative_position_bias_table,
                        ls1/gamma, norm2, mlp/Dense_{0,1}, ls2/gamma
  stages_3/norm, head

Intermediates: ``stage_{i}`` (NHWC output of stage ``i``, as timm's
``forward_intermediates``) and ``features`` (the pooled head input).
"""

import functools
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import kernels
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_model

Array = Any

LN_EPS = 1e-5


class MBConv(nn.Module):
  """Depthwise 3x3, GELU, squeeze-excitation, 1x1 (no norms, no biases) + residual."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    dim = x.shape[-1]
    gelu = layers.gelu
    y = gelu(layers.DepthwiseConv(dim, (3, 3), padding=((1, 1), (1, 1)), name="conv_dw",
                                  **kw)(x))
    y = layers.squeeze_excite(y, layers.make_divisible(dim * 0.25, 8, round_limit=0.0),
                              act=gelu, conv_kernels=True, names=("se_fc1", "se_fc2"),
                              **kw)
    return x + layers.Conv(dim, (1, 1), name="conv_pw", **kw)(y)


class Downsample(nn.Module):
  """LayerNorm, MBConv, 3x3 stride-2 conv to ``out_dim``, LayerNorm."""
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
    x = MBConv(name="conv_block", **kw)(x)
    x = nn.Conv(self.out_dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                use_bias=False, name="reduction", **kw)(x)
    return layers.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)


def _max_pool(x: Array) -> Array:
  """3x3 stride-2 max pooling with one pixel of (ignored) padding, as torch's."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class LayerScale(nn.Module):
  init_value: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma.astype(x.dtype)


class GlobalQueryAttention(nn.Module):
  """Window attention whose query is the stage's global query (no query projection).

  The query map ``[B, wh, ww, C]`` is the same for every window: it is tiled over the
  map so that ``window_attention`` sees one query per position, like local attention.
  """
  num_heads: int
  window: tuple[int, int]
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, global_query: Array, *, bias: Array) -> Array:
    b, h, w, dim = x.shape
    head_dim = dim // self.num_heads
    projection = lambda name: layers.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    key, value = projection("key")(x), projection("value")(x)
    query = jnp.tile(global_query.astype(key.dtype),
                     (1, h // self.window[0], w // self.window[1], 1))
    query = query.reshape(b, h, w, self.num_heads, head_dim)
    out = kernels.window_attention(query, key, value, window=self.window, mode="block",
                                   bias=bias, impl=self.attention_impl)
    return layers.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype,
                               param_dtype=self.param_dtype, name="out")(out)


class GCViTBlock(nn.Module):
  """Pre-norm (global-query or local) window attention and MLP, with layer scale."""
  num_heads: int
  window: tuple[int, int]
  use_global: bool
  mlp_ratio: float = 3.0
  layer_scale: Optional[float] = None
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, global_query: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    scale = lambda name: (LayerScale(self.layer_scale, self.param_dtype, name=name)
                          if self.layer_scale is not None else (lambda y: y))
    bias = layers.RelativePositionBias(self.window, self.num_heads, self.param_dtype,
                                       name="relative_position_bias")()
    y = layers.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
    if self.use_global:
      y = GlobalQueryAttention(self.num_heads, self.window, self.attention_impl,
                               name="attn", **kw)(y, global_query, bias=bias)
    else:
      attention_fn = functools.partial(kernels.window_attention, window=self.window,
                                       mode="block", impl=self.attention_impl)
      y = layers.MultiHeadDotProductAttention(
          num_heads=self.num_heads, attention_fn=attention_fn, name="attn", **kw)(
              y, bias=bias)
    x = x + layers.DropPath(self.drop_path_rate)(scale("ls1")(y), train=train)
    y = layers.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)
    y = layers.MlpBlock(mlp_dim=int(dim * self.mlp_ratio), name="mlp", **kw)(y)
    return x + layers.DropPath(self.drop_path_rate)(scale("ls2")(y), train=train)


class GCViTStage(nn.Module):
  """[Downsample], global query, blocks alternating local / global, [final norm]."""
  dim: int
  depth: int
  num_heads: int
  window: tuple[int, int]
  pool_levels: int
  downsample: bool
  final_norm: bool
  drop_path_rates: Sequence[float]
  mlp_ratio: float = 3.0
  layer_scale: Optional[float] = None
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = Downsample(self.dim, name="downsample", **kw)(x)
    # The global query: MBConv (+ pooling) until the map is one window.
    g = x
    for k in range(max(1, self.pool_levels)):
      g = MBConv(name=f"global_block_{k}", **kw)(g)
      if k < self.pool_levels:
        g = _max_pool(g)
    if g.shape[1:3] != self.window:
      raise ValueError(
          f"GC ViT stage map {x.shape[1]}x{x.shape[2]} pools to a "
          f"{g.shape[1]}x{g.shape[2]} global query, but its window is "
          f"{self.window[0]}x{self.window[1]}: the model takes its image_size only")
    for j in range(self.depth):
      x = GCViTBlock(self.num_heads, self.window, use_global=j % 2 == 1,
                     mlp_ratio=self.mlp_ratio, layer_scale=self.layer_scale,
                     drop_path_rate=self.drop_path_rates[j],
                     attention_impl=self.attention_impl, name=f"blocks_{j}", **kw)(
                         x, g, train=train)
    if self.final_norm:
      x = layers.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(x)
    return x


class GCViT(nn.Module):
  """GC ViT classifier. Call with NHWC images of ``image_size``; returns float32 logits.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    image_size: the input resolution; sets the windows (``image_size // ratio``).
    embed_dim: width of stage 0 (and the stem); stage ``i`` has ``embed_dim * 2**i``.
    depths, num_heads: blocks and heads per stage.
    window_ratios: per-stage divisors of ``image_size`` giving the windows.
    mlp_ratio: MLP width over block width.
    layer_scale: initial layer-scale value (None: no layer scale).
    drop_path_rate: stochastic depth at the last block, linear from 0 over blocks.
    attention_impl: implementation of ``vit_jax.kernels.window_attention``.
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  embed_dim: int = 64
  depths: Sequence[int] = (3, 4, 19, 5)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  window_ratios: Sequence[int] = (32, 32, 16, 32)
  mlp_ratio: float = 3.0
  layer_scale: Optional[float] = None
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def stage_geometry(self) -> list[tuple[tuple[int, int], tuple[int, int], int]]:
    """``(map size, window, pooling levels of the global query)`` of each stage."""
    size = layers.to_2tuple(self.image_size)
    feat = tuple(s // 4 for s in size)
    out = []
    for i, ratio in enumerate(self.window_ratios):
      if i > 0:
        feat = tuple(f // 2 for f in feat)
      window = tuple(s // ratio for s in size)
      if min(window) < 1:
        raise ValueError(f"GC ViT image_size {size} is too small for window ratio {ratio}")
      levels = int(math.log2(min(feat) / min(window)))
      out.append((feat, window, levels))
    return out

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    layers.check_per_stage(self, ("num_heads", "window_ratios"), len(self.depths))
    size = layers.to_2tuple(self.image_size)
    if tuple(images.shape[1:3]) != size:
      raise ValueError(
          f"this GC ViT is built for {size[0]}x{size[1]} images (its windows and the "
          "pooling that makes each stage's global query one window large depend on "
          f"the resolution); got {images.shape[1]}x{images.shape[2]}. Create the model "
          f"with image_size=({images.shape[1]}, {images.shape[2]}) (sides divisible "
          "by 32).")
    geometry = self.stage_geometry()

    x = nn.Conv(self.embed_dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                name="stem_conv1", **kw)(images.astype(dtype))
    x = Downsample(self.embed_dim, name="stem_down", **kw)(x)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      _, window, levels = geometry[i]
      start = sum(self.depths[:i])
      x = GCViTStage(self.embed_dim * 2 ** i, depth, heads, window, levels,
                     downsample=i > 0, final_norm=i == len(self.depths) - 1,
                     drop_path_rates=rates[start:start + depth], mlp_ratio=self.mlp_ratio,
                     layer_scale=self.layer_scale, attention_impl=self.attention_impl,
                     name=f"stages_{i}", **kw)(x, train=train)
      self.sow("intermediates", f"stage_{i}", x)

    return layers.classifier_head(self, jnp.mean(x, axis=(1, 2)), self.num_classes,
                                  kernel_init=layers.head_init(self.head_zeroinit), **kw)


def _timm_mbconv(state: StateDict, prefix: str) -> dict:
  return {"conv_dw": state.conv(f"{prefix}.conv_dw", bias=False),
          "se_fc1": state.conv(f"{prefix}.se.fc1", bias=False),
          "se_fc2": state.conv(f"{prefix}.se.fc2", bias=False),
          "conv_pw": state.conv(f"{prefix}.conv_pw", bias=False)}


def _timm_downsample(state: StateDict, prefix: str) -> dict:
  return {"norm1": state.norm(f"{prefix}.norm1"),
          "conv_block": _timm_mbconv(state, f"{prefix}.conv_block"),
          "reduction": state.conv(f"{prefix}.reduction", bias=False),
          "norm2": state.norm(f"{prefix}.norm2")}


@register_timm_converter("gcvit")
def convert_timm_gcvit(state: StateDict, model: GCViT) -> dict:
  """timm ``GlobalContextVit`` state dict -> GC ViT params."""
  state.skip(lambda k: k.endswith("relative_position_index"))
  params = {"stem_conv1": state.conv("stem.conv1"),
            "stem_down": _timm_downsample(state, "stem.down")}
  for i, ((_, _, levels), depth, heads) in enumerate(
      zip(model.stage_geometry(), model.depths, model.num_heads)):
    prefix = f"stages.{i}"
    stage = {}
    if i > 0:
      stage["downsample"] = _timm_downsample(state, f"{prefix}.downsample")
    for k in range(max(1, levels)):
      stage[f"global_block_{k}"] = _timm_mbconv(
          state, f"{prefix}.global_block.blocks.conv{k + 1}")
    for j in range(depth):
      block = f"{prefix}.blocks.{j}"
      # timm's qkv of a global block holds key and value only.
      linears = {"qkv": ("key", "value")} if j % 2 else layers.FUSED_QKV
      attn = layers.timm_attention_params(state, f"{block}.attn", heads, linears=linears)
      stage[f"blocks_{j}"] = {
          "norm1": state.norm(f"{block}.norm1"),
          "attn": attn,
          "relative_position_bias": {"relative_position_bias_table": state.take(
              f"{block}.attn.rel_pos.relative_position_bias_table")},
          "norm2": state.norm(f"{block}.norm2"),
          "mlp": layers.timm_mlp_params(state, f"{block}.mlp"),
      }
      if model.layer_scale is not None:
        stage[f"blocks_{j}"]["ls1"] = {"gamma": state.take(f"{block}.ls1.gamma")}
        stage[f"blocks_{j}"]["ls2"] = {"gamma": state.take(f"{block}.ls2.gamma")}
    if i == len(model.depths) - 1:
      stage["norm"] = state.norm(f"{prefix}.norm")
    params[f"stages_{i}"] = stage
  if model.num_classes:
    params["head"] = state.linear("head.fc")
  return params


# timm's registered GC ViT models: (embed_dim, depths, num_heads, mlp_ratio, layer_scale).
VARIANTS = {
    "gcvit_xxtiny": (64, (2, 2, 6, 2), (2, 4, 8, 16), 3.0, None),
    "gcvit_xtiny": (64, (3, 4, 6, 5), (2, 4, 8, 16), 3.0, None),
    "gcvit_tiny": (64, (3, 4, 19, 5), (2, 4, 8, 16), 3.0, None),
    "gcvit_small": (96, (3, 4, 19, 5), (3, 6, 12, 24), 2.0, 1e-5),
    "gcvit_base": (128, (3, 4, 19, 5), (4, 8, 16, 32), 2.0, 1e-5),
}


def _register_variants():
  for name, (dim, depths, heads, mlp_ratio, layer_scale) in VARIANTS.items():
    defaults = dict(embed_dim=dim, depths=depths, num_heads=heads, mlp_ratio=mlp_ratio,
                    layer_scale=layer_scale, image_size=224)

    def factory(defaults=defaults, **overrides):
      return GCViT(**{**defaults, **overrides})

    factory.__doc__ = f"GC ViT {name} (timm)."
    register_model(name, family="gcvit", image_size=224)(factory)


_register_variants()
