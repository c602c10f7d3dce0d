"""Pyramid Vision Transformer v2 (Wang et al., 2022), matching timm's ``pvt_v2``.

A four-stage pyramid (strides 4, 8, 16, 32). PVT v2 improves on PVT v1 with

- overlapping patch embeddings: a 7x7 stride-4 conv stem, then 3x3 stride-2 convs
  between stages (padding k//2, so a side of ``n`` becomes ``ceil(n / stride)``);
- spatial-reduction attention (SRA): queries from every position, keys and values
  from the map shrunk by a ``sr x sr`` stride-``sr`` conv and a LayerNorm;
- a 3x3 depth-wise conv between the two MLP layers (it replaces position embeddings,
  so the model takes any input size);
- ``linear=True`` (``pvt_v2_b2_li``): linear SRA, keys and values from the map
  adaptively average-pooled to 7x7, then a 1x1 conv, LayerNorm and GELU; the MLP gets
  an extra ReLU before its depth-wise conv.

Parameter tree (timm's module names, ``.`` -> ``/`` and ``stages.0`` -> ``stages_0``)::

  patch_embed/{proj,norm}                       7x7/4 conv stem + LayerNorm
  stages_{i}/downsample/{proj,norm}             3x3/2 conv + LayerNorm (i > 0)
  stages_{i}/blocks_{j}/norm1, sr/{conv,norm}, attn/{query,key,value,out},
                        norm2, mlp/{Dense_0,dwconv,Dense_1}
  stages_{i}/norm                               (output of stage i)
  head

Each stage's output (after its norm) is sown as an NHWC map ``stage_{i}``; the
globally averaged last map, the head's input, as ``features``.

Input sizes: any, as long as every stage's map is at least ``sr x sr`` for its
spatial-reduction ratio (the reduction conv has no padding); with the default ratios
(8, 4, 2, 1) that means sides of at least 29 pixels. Linear SRA pools to 7x7 from
any size. Like timm, a map side that is not a multiple of ``sr`` drops its last
``side % sr`` rows/columns from the keys and values (not from the queries).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any

# Dense layers: truncated normal(0.02), zero bias, as timm initialises them.
dense_init = nn.initializers.truncated_normal(0.02)
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Tensor parallelism (see vit_jax.sharding): attention and the MLP's dense layers are
# the shared layers; the depthwise conv between them acts on each hidden unit alone,
# so it is split like them.
PARAM_AXES = (
    (r"(^|/)mlp/dwconv/kernel$", (None, None, None, "mlp")),
    (r"(^|/)mlp/dwconv/bias$", ("mlp",)),
)
sharding.register_param_axes(PARAM_AXES)

# Depths/widths/heads of timm's registered variants; the rest are PVT v2 defaults.
VARIANTS = {
    "pvt_v2_b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "pvt_v2_b1": dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512)),
    "pvt_v2_b2": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512)),
    "pvt_v2_b3": dict(depths=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512)),
    "pvt_v2_b4": dict(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512)),
    "pvt_v2_b5": dict(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512),
                      mlp_ratios=(4, 4, 4, 4)),
    "pvt_v2_b2_li": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512),
                         linear=True),
}


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``[size_out, size_in]`` weights of 1D adaptive average pooling (PyTorch's bins).

  Bin ``i`` averages inputs ``floor(i * n / m) .. ceil((i + 1) * n / m) - 1``; bins
  overlap when ``n`` is not a multiple of ``m`` and repeat inputs when ``m > n``.
  """
  matrix = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: Array, size: tuple[int, int]) -> Array:
  """``nn.AdaptiveAvgPool2d(size)`` on an NHWC map."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], size[0]), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], size[1]), x.dtype)
  return jnp.einsum("ph,bhwc,qw->bpqc", ph, x, pw)


def overlap_patch_embed(dim: int, patch_size: int, stride: int, **kw) -> nn.Module:
  """Conv with padding ``patch // 2`` (neighbouring patches overlap) + LayerNorm."""
  return layers.ConvEmbed(dim, patch_size, stride, patch_size // 2, kernel_init=conv_init,
                          **kw)


class SpatialReduction(nn.Module):
  """The key/value map of SRA: ``[B, H, W, C] -> [B, h, w, C]``.

  ``linear=False``: ``sr x sr`` conv with stride ``sr`` (no padding) + LayerNorm.
  ``linear=True``: adaptive average pool to ``pool_size`` + 1x1 conv + LayerNorm + GELU.
  """
  sr_ratio: int = 1
  linear: bool = False
  pool_size: int = 7
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    if self.linear:
      x = adaptive_avg_pool(x, (self.pool_size, self.pool_size))
      kernel = (1, 1)
    else:
      kernel = (self.sr_ratio, self.sr_ratio)
    x = layers.Conv(dim, kernel, strides=kernel, padding="VALID", kernel_init=conv_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    x = layers.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    return layers.gelu(x) if self.linear else x


def spatial_reduction_attention(x: Array, grid: tuple[int, int], *, num_heads: int,
                                sr_ratio: int, linear: bool,
                                attention_dropout_rate: float, dtype: Any,
                                param_dtype: Any, train: bool) -> Array:
  """SRA on ``[B, N, C]`` tokens laid out on ``grid`` (shared with PVT v1).

  Call it from a compact method: it creates the submodules ``sr`` (when keys and
  values are reduced) and ``attn`` in the calling module's scope, so that a block's
  parameters read ``sr/...`` and ``attn/query`` like timm's ``attn.sr``/``attn.q``.
  """
  batch, tokens, dim = x.shape
  kv = x
  if linear or sr_ratio > 1:
    height, width = grid
    if tokens != height * width:
      raise ValueError(f"spatial reduction needs {height}x{width} map tokens only, got "
                       f"{tokens} tokens")
    kv = SpatialReduction(sr_ratio=sr_ratio, linear=linear, dtype=dtype,
                          param_dtype=param_dtype, name="sr")(
                              x.reshape(batch, height, width, dim))
    kv = kv.reshape(batch, -1, dim)
  return layers.MultiHeadDotProductAttention(
      num_heads=num_heads, attention_dropout_rate=attention_dropout_rate,
      kernel_init=dense_init, dtype=dtype, param_dtype=param_dtype, name="attn")(
          x, kv, train=train)


class MlpWithDepthwiseConv(nn.Module):
  """Dense -> (ReLU) -> 3x3 depth-wise conv -> GELU -> Dense on an NHWC map."""
  hidden_dim: int
  extra_relu: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    dense = lambda features, name: layers.Dense(
        features, kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    x = dense(self.hidden_dim, "Dense_0")(x)
    if self.extra_relu:
      x = nn.relu(x)
    # timm: normal(sqrt(2 / fan_out)) with fan_out = 3 * 3 for a depth-wise kernel.
    x = layers.DepthwiseConv(
        self.hidden_dim, (3, 3), padding=((1, 1), (1, 1)),
        kernel_init=nn.initializers.normal(math.sqrt(2.0 / 9)), dtype=self.dtype,
        param_dtype=self.param_dtype, name="dwconv")(x)
    x = layers.gelu(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = dense(dim, "Dense_1")(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)


class Block(nn.Module):
  """Pre-norm block on an NHWC map: x + SRA(LN(x)), then x + MLP-with-dwconv(LN(x))."""
  num_heads: int
  mlp_ratio: float
  sr_ratio: int = 1
  linear: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    batch, height, width, dim = x.shape
    norm = lambda name: layers.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    y = norm("norm1")(x).reshape(batch, height * width, dim)
    y = spatial_reduction_attention(
        y, (height, width), num_heads=self.num_heads, sr_ratio=self.sr_ratio,
        linear=self.linear, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype, train=train)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    x = x + layers.DropPath(self.drop_path_rate)(y.reshape(x.shape), train=train)
    y = MlpWithDepthwiseConv(
        hidden_dim=int(dim * self.mlp_ratio), extra_relu=self.linear,
        dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
        name="mlp")(norm("norm2")(x), train=train)
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class Stage(nn.Module):
  """(Overlapping downsample) -> blocks -> LayerNorm, NHWC in and out."""
  dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  linear: bool
  downsample: bool
  drop_path_rates: Sequence[float]
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if self.downsample:
      x = overlap_patch_embed(self.dim, 3, 2, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="downsample")(x)
    for j in range(self.depth):
      x = Block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                sr_ratio=self.sr_ratio, linear=self.linear,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=self.drop_path_rates[j], dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"blocks_{j}")(x, train=train)
    return layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="norm")(x)


class PyramidVisionTransformerV2(nn.Module):
  """PVT v2 classifier. Call with NHWC images of any size the SR ratios allow.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    depths, embed_dims, num_heads, mlp_ratios, sr_ratios: per stage.
    linear: linear SRA (7x7 average pooling) instead of strided-conv reduction.
    dropout_rate: after the attention projection and in the MLP (timm's proj_drop).
    attention_dropout_rate: on the attention weights.
    drop_path_rate: stochastic depth of the last block, rising linearly from 0.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  depths: Sequence[int] = (3, 4, 6, 3)
  embed_dims: Sequence[int] = (64, 128, 320, 512)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  linear: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
    """Each stage's map size for an input, or a ValueError naming the constraint."""
    sizes = []
    h, w = -(-height // 4), -(-width // 4)
    for i in range(len(self.depths)):
      if i:
        h, w = -(-h // 2), -(-w // 2)
      sr = self.sr_ratios[i]
      if not self.linear and (h < sr or w < sr):
        raise ValueError(
            f"PVT v2 stage {i} reduces keys/values with a {sr}x{sr} stride-{sr} conv, so "
            f"its map must be at least {sr}x{sr}; a {height}x{width} input gives {h}x{w} "
            f"there. Use a larger input (each stage's side is ceil(side / {4 * 2 ** i}) "
            "of the image side).")
      sizes.append((h, w))
    return sizes

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    num_stages = len(self.depths)
    layers.check_per_stage(self, ("embed_dims", "num_heads", "mlp_ratios", "sr_ratios"),
                           num_stages)
    layers.check_images(images)
    self.stage_sizes(images.shape[1], images.shape[2])

    x = overlap_patch_embed(self.embed_dims[0], 7, 4, dtype=dtype, param_dtype=param_dtype,
                            name="patch_embed")(images.astype(dtype))
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    start = 0
    for i in range(num_stages):
      x = Stage(dim=self.embed_dims[i], depth=self.depths[i],
                num_heads=self.num_heads[i], mlp_ratio=self.mlp_ratios[i],
                sr_ratio=self.sr_ratios[i], linear=self.linear, downsample=i > 0,
                drop_path_rates=rates[start:start + self.depths[i]],
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate, dtype=dtype,
                param_dtype=param_dtype, name=f"stages_{i}")(x, train=train)
      start += self.depths[i]
      self.sow("intermediates", f"stage_{i}", x)

    return layers.classifier_head(self, jnp.mean(x, axis=(1, 2)), self.num_classes,
                                  kernel_init=dense_init, dtype=dtype,
                                  param_dtype=param_dtype)


def _timm_embed(state: StateDict, prefix: str) -> dict:
  return {"proj": state.conv(f"{prefix}.proj"), "norm": state.norm(f"{prefix}.norm")}


def timm_sra(state: StateDict, prefix: str, num_heads: int, reduces: bool) -> dict:
  """timm/official SRA (``q``, ``kv``, ``proj``, optional ``sr`` conv + ``norm``)."""
  out = {"attn": layers.timm_attention_params(state, prefix, num_heads, linears=layers.Q_KV)}
  if reduces:
    out["sr"] = {"conv": state.conv(f"{prefix}.sr"), "norm": state.norm(f"{prefix}.norm")}
  return out


@register_timm_converter("pvt_v2")
def convert_timm_pvt_v2(state: StateDict, model: PyramidVisionTransformerV2) -> dict:
  """timm ``PyramidVisionTransformerV2`` state dict -> parameters (names as timm's)."""
  params = {"patch_embed": _timm_embed(state, "patch_embed")}
  for i, depth in enumerate(model.depths):
    stage = {"norm": state.norm(f"stages.{i}.norm")}
    if i:
      stage["downsample"] = _timm_embed(state, f"stages.{i}.downsample")
    for j in range(depth):
      p = f"stages.{i}.blocks.{j}"
      stage[f"blocks_{j}"] = {
          "norm1": state.norm(f"{p}.norm1"),
          **timm_sra(state, f"{p}.attn", model.num_heads[i],
                     model.linear or model.sr_ratios[i] > 1),
          "norm2": state.norm(f"{p}.norm2"),
          "mlp": {"Dense_0": state.linear(f"{p}.mlp.fc1"),
                  "dwconv": state.conv(f"{p}.mlp.dwconv"),
                  "Dense_1": state.linear(f"{p}.mlp.fc2")},
      }
    params[f"stages_{i}"] = stage
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


def _register_variants():
  for name, config in VARIANTS.items():
    register_variant(name, PyramidVisionTransformerV2, config, family="pvt_v2",
                     image_size=224,
                     doc=f"timm's {name} (PVT v2).")


_register_variants()
