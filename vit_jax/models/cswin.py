"""CSWin Transformer (Dong et al., CVPR 2022), as the official code builds it.

Not in timm. Reference: microsoft/CSWin-Transformer, ``models/cswin.py``
(``CSWin_64_12211_tiny_224`` ... ``CSWin_144_24322_large_384``), registered here under
timm-style names ``cswin_{tiny,small,base,large}_224`` and ``cswin_{base,large}_384``.

Four stages (strides 4, 8, 16, 32): a 7x7 stride-4 conv stem (padding 2) + LayerNorm,
3x3 stride-2 convs + LayerNorm between stages, and pre-norm blocks whose attention is
**cross-shaped window** self-attention: the channels (and heads) are split in two
halves; the first half attends inside vertical stripes (full height, ``sw`` columns),
the second inside horizontal stripes (``sw`` rows, full width), in parallel, and the
halves are concatenated before the output projection. The stripe width ``sw`` grows
per stage (1, 2, 7, 7 at 224). The last stage attends globally with all heads.

**LePE** (locally-enhanced positional encoding): a 3x3 depth-wise conv of the values,
computed inside each stripe (zero padding at the stripe borders, as the official code
cuts the stripes before the conv), is added to the attention output.

Parameter tree::

  patch_embed/{proj,norm}
  stages_{i}/downsample/{proj,norm}          (i > 0)
  stages_{i}/blocks_{j}/norm1, qkv, lepe_{0,1}, proj, norm2, mlp/{Dense_0,Dense_1}
  norm, head

Sown: ``stage_{i}``, each stage's output as an NHWC map (before the final norm), and
``features`` (the average of the final-normed last map).

Input sizes: every stage with stripes needs map sides that are multiples of its stripe
width (7 at stage 2 for the 224 models: image sides that are multiples of 112 work,
224 included; 12 for the 384 models: multiples of 192). Padding would change the LePE
and the attention inside the border stripes, so other sizes are a ValueError. The
official code takes only square inputs of its construction size; here the parameters
do not depend on the input size, and maps need not be square.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import kernels, sharding
from vit_jax.kernels.window_attention import partition, unpartition
from vit_jax.models import layers
from vit_jax.models.convert import StateDict
from vit_jax.models.official import register_official_converter
from vit_jax.models.registry import register_variant

Array = Any

dense_init = nn.initializers.truncated_normal(0.02)

# Tensor parallelism (see vit_jax.sharding): ``proj`` reads the heads of both stripe
# branches one after the other, so it splits over ``heads`` and ends in one
# all-reduce. The fused ``qkv`` output is laid out q | k | v, each branch by branch:
# contiguous tensor blocks would cut across q, k and v, so its axis is ``qkv``, which
# the default rules leave whole (each device computes all of q, k, v and attends
# with its own heads). The MLP is the shared layer.
PARAM_AXES = (
    (r"(^|/)stages_\d+/blocks_\d+/qkv/kernel$", ("embed", "qkv")),
    (r"(^|/)stages_\d+/blocks_\d+/qkv/bias$", ("qkv",)),
    (r"(^|/)stages_\d+/blocks_\d+/proj/kernel$", ("heads", "embed")),
)
sharding.register_param_axes(PARAM_AXES)

# Official configurations: stem width, depths, heads, stripe widths, resolution.
VARIANTS = {
    "cswin_tiny_224": dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16),
                           split_sizes=(1, 2, 7, 7)),
    "cswin_small_224": dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16),
                            split_sizes=(1, 2, 7, 7)),
    "cswin_base_224": dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32),
                           split_sizes=(1, 2, 7, 7)),
    "cswin_large_224": dict(embed_dim=144, depths=(2, 4, 32, 2),
                            num_heads=(6, 12, 24, 24), split_sizes=(1, 2, 7, 7)),
    "cswin_base_384": dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32),
                           split_sizes=(1, 2, 12, 12)),
    "cswin_large_384": dict(embed_dim=144, depths=(2, 4, 32, 2),
                            num_heads=(6, 12, 24, 24), split_sizes=(1, 2, 12, 12)),
}


def stripe_windows(height: int, width: int, stripe: int, branches: int
                   ) -> list[tuple[int, int]]:
  """The window of each branch: vertical ``(H, sw)`` and horizontal ``(sw, W)``
  stripes, or the whole map for a single (global) branch."""
  if branches == 1:
    return [(height, width)]
  return [(height, stripe), (stripe, width)]


def lepe(conv: nn.Module, value: Array, window: tuple[int, int]) -> Array:
  """Depth-wise ``conv`` of ``[B, H, W, C]`` values applied to each window separately."""
  batch, height, width, dim = value.shape
  stripes = partition(value, window)  # [B, n, hs * ws, C]
  num = stripes.shape[1]
  out = conv(stripes.reshape((batch * num,) + tuple(window) + (dim,)))
  return unpartition(out.reshape(batch, num, -1, dim), window, (height, width))


class CSWinBlock(nn.Module):
  """Pre-norm block on an NHWC map: cross-shaped window attention + LePE, then MLP."""
  num_heads: int
  split_size: int
  branches: int = 2
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    batch, height, width, dim = x.shape
    norm = lambda name: layers.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    dense = lambda features, name: layers.Dense(
        features, kernel_init=dense_init, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    qkv = dense(3 * dim, "qkv")(norm("norm1")(x))
    query, key, value = jnp.split(qkv, 3, axis=-1)
    part, heads = dim // self.branches, self.num_heads // self.branches
    outs = []
    for b, window in enumerate(stripe_windows(height, width, self.split_size,
                                              self.branches)):
      q, k, v = (t[..., b * part:(b + 1) * part] for t in (query, key, value))
      split_heads = lambda t: t.reshape(batch, height, width, heads, part // heads)
      out = kernels.window_attention(split_heads(q), split_heads(k), split_heads(v),
                                     window=window, mode="block",
                                     impl=self.attention_impl)
      conv = layers.DepthwiseConv(part, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"lepe_{b}")
      outs.append(out.reshape(batch, height, width, part) + lepe(conv, v, window))
    y = dense(dim, "proj")(jnp.concatenate(outs, axis=-1))
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    y = layers.MlpBlock(mlp_dim=int(dim * self.mlp_ratio), dropout_rate=self.dropout_rate,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(
                            norm("norm2")(x), train=train)
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class Stage(nn.Module):
  dim: int
  depth: int
  num_heads: int
  split_size: int
  branches: int
  downsample: bool
  drop_path_rates: Sequence[float]
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if self.downsample:
      x = layers.ConvEmbed(self.dim, 3, 2, 1, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="downsample")(x)
    for j in range(self.depth):
      x = CSWinBlock(num_heads=self.num_heads, split_size=self.split_size,
                     branches=self.branches, mlp_ratio=self.mlp_ratio,
                     dropout_rate=self.dropout_rate,
                     drop_path_rate=self.drop_path_rates[j],
                     attention_impl=self.attention_impl, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"blocks_{j}")(x, train=train)
    return x


class CSWinTransformer(nn.Module):
  """CSWin classifier. Call with NHWC images whose stage maps fit the stripes.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    embed_dim: width of stage 0 (doubled at every later stage).
    depths, num_heads, split_sizes: per stage (split_sizes: stripe widths; the last
      stage attends globally, its entry is not used).
    mlp_ratio: MLP width / model width.
    dropout_rate: after the attention projection and in the MLP. (No dropout of the
      attention weights: the official models train without it, and the stripes run
      through the window-attention kernel, which has none.)
    drop_path_rate: stochastic depth of the last block, rising linearly from 0.
    attention_impl: backend of ``vit_jax.kernels.window_attention`` for the stripes.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  embed_dim: int = 64
  depths: Sequence[int] = (1, 2, 21, 1)
  num_heads: Sequence[int] = (2, 4, 8, 16)
  split_sizes: Sequence[int] = (1, 2, 7, 7)
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
    """Each stage's map size for an input, or a ValueError naming the constraint."""
    if height < 7 or width < 7:
      raise ValueError(f"CSWin needs images of at least 7x7, got {height}x{width}")
    h, w = (height - 3) // 4 + 1, (width - 3) // 4 + 1
    sizes = []
    last = len(self.depths) - 1
    multiple = 4
    for i, sw in enumerate(self.split_sizes[:last]):
      multiple = math.lcm(multiple, 4 * 2 ** i * sw)
    for i in range(len(self.depths)):
      if i:
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
      sw = self.split_sizes[i]
      if i < last and (h % sw or w % sw):
        raise ValueError(
            f"CSWin stage {i} cuts its {h}x{w} feature map (from a {height}x{width} "
            f"input) into stripes of width {sw}: both sides must be multiples of {sw}. "
            f"With these stripe widths, image sides that are multiples of {multiple} "
            "work.")
      sizes.append((h, w))
    return sizes

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    num_stages = len(self.depths)
    layers.check_per_stage(self, ("num_heads", "split_sizes"), num_stages)
    for i, heads in enumerate(self.num_heads[:-1]):
      if heads % 2:
        raise ValueError(f"CSWin stage {i} splits its heads between two stripe "
                         f"directions: num_heads must be even, got {heads}")
    layers.check_images(images)
    self.stage_sizes(images.shape[1], images.shape[2])

    x = layers.ConvEmbed(self.embed_dim, 7, 4, 2, dtype=dtype, param_dtype=param_dtype,
                  name="patch_embed")(images.astype(dtype))
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    start = 0
    for i in range(num_stages):
      last = i == num_stages - 1
      x = Stage(dim=self.embed_dim * 2 ** i, depth=self.depths[i],
                num_heads=self.num_heads[i], split_size=self.split_sizes[i],
                branches=1 if last else 2, downsample=i > 0,
                drop_path_rates=rates[start:start + self.depths[i]],
                mlp_ratio=self.mlp_ratio, dropout_rate=self.dropout_rate,
                attention_impl=self.attention_impl, dtype=dtype,
                param_dtype=param_dtype, name=f"stages_{i}")(x, train=train)
      start += self.depths[i]
      self.sow("intermediates", f"stage_{i}", x)

    x = layers.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                     name="norm")(x)
    return layers.classifier_head(self, jnp.mean(x, axis=(1, 2)), self.num_classes,
                                  kernel_init=dense_init, dtype=dtype,
                                  param_dtype=param_dtype)


@register_official_converter("cswin")
def convert_official_cswin(state: StateDict, model: CSWinTransformer) -> dict:
  """microsoft/CSWin-Transformer ``models/cswin.py`` state dict -> parameters.

  Official names: ``stage1_conv_embed.0`` (conv) and ``.2`` (norm), ``merge{1..3}``,
  ``stage{1..4}.{j}`` (``qkv``, ``norm1``, ``attns.{k}.get_v``, ``proj``, ``norm2``,
  ``mlp.fc1``/``fc2``), ``norm``, ``head``.
  """
  params = {"patch_embed": {"proj": state.conv("stage1_conv_embed.0"),
                            "norm": state.norm("stage1_conv_embed.2")},
            "norm": state.norm("norm")}
  num_stages = len(model.depths)
  for i, depth in enumerate(model.depths):
    stage = {}
    if i:
      stage["downsample"] = {"proj": state.conv(f"merge{i}.conv"),
                             "norm": state.norm(f"merge{i}.norm")}
    branches = 1 if i == num_stages - 1 else 2
    for j in range(depth):
      p = f"stage{i + 1}.{j}"
      block = {"norm1": state.norm(f"{p}.norm1"), "qkv": state.linear(f"{p}.qkv"),
               "proj": state.linear(f"{p}.proj"), "norm2": state.norm(f"{p}.norm2"),
               "mlp": layers.timm_mlp_params(state, f"{p}.mlp")}
      for b in range(branches):
        block[f"lepe_{b}"] = state.conv(f"{p}.attns.{b}.get_v")
      stage[f"blocks_{j}"] = block
    params[f"stages_{i}"] = stage
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


def _register_variants():
  for name, config in VARIANTS.items():
    size = int(name.rsplit("_", 1)[1])
    register_variant(name, CSWinTransformer, config, family="cswin", image_size=size,
                     doc=f"Official CSWin ({name}), {size}x{size}.")


_register_variants()
