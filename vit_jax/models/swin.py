"""Swin Transformer v1 (Liu et al., 2021): shifted-window attention in a 4-stage pyramid.

Matches timm's ``swin_transformer.SwinTransformer`` (and so the official
microsoft/Swin-Transformer models timm carries) number for number: patch embedding
with LayerNorm, stages of blocks that alternate regular and shifted ``window x window``
attention with a relative position bias, patch merging between stages, final
LayerNorm, global average pooling, linear head.

Windowed attention goes through ``vit_jax.kernels.window_attention`` (``mode="block"``);
``attention_impl`` selects its implementation. The shifted windows are a ``jnp.roll``
of the map by half a window before the attention and back after it, with timm's
additive mask (-100 between tokens that come from different regions of the unrolled
map).

Resolution: ``image_size`` fixes each stage's window and shift the way timm's
``img_size`` does (a stage whose map is not larger than the window uses one window of
the map's size and no shift). Any other input whose sides are multiples of the patch
size (4) is accepted: each stage pads its map on the bottom/right to a multiple of the
window (and patch merging pads odd maps), exactly as timm does with
``dynamic_img_size=True``. The relative position tables only depend on the windows,
so one set of weights serves every input size.

Parameter tree::

  patch_embed/{kernel,bias}, patch_norm/{scale,bias}
  stages_{i}/downsample/{norm,reduction}                   (i > 0; patch merging)
  stages_{i}/blocks_{j}/norm1, attn/{query,key,value,out},
                        relative_position_bias/relative_position_bias_table,
                        norm2, mlp/Dense_{0,1}
  norm, head

Intermediates: ``stage_{i}`` (NHWC map after stage ``i``, before the final norm, as
timm's ``forward_intermediates``) and ``features`` (the pooled head input).
"""

import functools
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax import kernels
from vit_jax.models import layers
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any


def stage_windows(grid: tuple[int, int], window: tuple[int, int], num_stages: int
                  ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """``(window, shift)`` of each stage for a patch grid, following timm's rule.

  A stage whose map side is not larger than the window uses the map side as its
  window along that axis and does not shift along it.
  """
  out = []
  size = grid
  for i in range(num_stages):
    if i > 0:
      size = tuple((s + 1) // 2 for s in size)
    win = tuple(s if s <= w else w for s, w in zip(size, window))
    shift = tuple(0 if s <= w else w // 2 for s, w in zip(size, window))
    out.append((win, shift))
  return out


def shifted_window_mask(size: tuple[int, int], window: tuple[int, int],
                        shift: tuple[int, int]) -> np.ndarray:
  """timm's shifted-window mask for a (padded) ``size`` map: ``[num_windows, P, P]``.

  The rolled map is cut into up to 3x3 regions; tokens attend only within their
  region (0), across regions they get -100.
  """
  regions = np.zeros(size, np.int32)
  count = 0
  for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
    for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]),
                 slice(-shift[1], None)):
      regions[rows, cols] = count
      count += 1
  h, w = size
  regions = regions.reshape(h // window[0], window[0], w // window[1], window[1])
  regions = regions.transpose(0, 2, 1, 3).reshape(-1, window[0] * window[1])
  return np.where(regions[:, None, :] != regions[:, :, None], -100.0, 0.0).astype(np.float32)


class SwinBlock(nn.Module):
  """(Shifted-)window attention and MLP, each pre-norm with a residual."""
  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int]
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    _, height, width, dim = x.shape
    norm = lambda name: layers.LayerNorm(epsilon=1e-5, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    y = norm("norm1")(x)
    shifted = any(self.shift)
    if shifted:
      y = jnp.roll(y, (-self.shift[0], -self.shift[1]), axis=(1, 2))
    # Pad (after the roll, like timm) so that the windows tile the map.
    pad_h = -height % self.window[0]
    pad_w = -width % self.window[1]
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    mask = None
    if shifted:
      mask = jnp.asarray(shifted_window_mask((height + pad_h, width + pad_w),
                                             self.window, self.shift))
    bias = layers.RelativePositionBias(self.window, self.num_heads, self.param_dtype,
                                       name="relative_position_bias")()
    attention_fn = functools.partial(kernels.window_attention, window=self.window,
                                     mode="block", impl=self.attention_impl)
    y = layers.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_fn=attention_fn, name="attn")(y, bias=bias, mask=mask)
    y = y[:, :height, :width]
    if shifted:
      y = jnp.roll(y, self.shift, axis=(1, 2))
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    y = layers.MlpBlock(mlp_dim=int(dim * self.mlp_ratio), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x))
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class PatchMerging(nn.Module):
  """2x2 neighbours -> channels (pad odd sides), LayerNorm, linear to ``out_dim``."""
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = h + h % 2, w + w % 2
    # Channel order (col offset, row offset, c): x[0::2, 0::2], x[1::2, 0::2], ...
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = layers.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    return layers.Dense(self.out_dim, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="reduction")(x)


class SwinStage(nn.Module):
  """Patch merging (all stages but the first), then ``depth`` blocks.

  Blocks alternate regular (even) and shifted (odd) windows.
  """
  dim: int
  depth: int
  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int]
  downsample: bool
  drop_path_rates: Sequence[float]
  mlp_ratio: float = 4.0
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if self.downsample:
      x = PatchMerging(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="downsample")(x)
    for j in range(self.depth):
      x = SwinBlock(num_heads=self.num_heads, window=self.window,
                    shift=self.shift if j % 2 else (0, 0), mlp_ratio=self.mlp_ratio,
                    drop_path_rate=self.drop_path_rates[j],
                    attention_impl=self.attention_impl, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"blocks_{j}")(x, train=train)
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer classifier. Call with NHWC images; returns float32 logits.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    image_size: the resolution that sets each stage's window and shift (timm's
      ``img_size``); other multiples of ``patch_size`` are padded per window.
    embed_dim: width of stage 0; stage ``i`` has ``embed_dim * 2**i``.
    depths, num_heads: blocks and heads per stage.
    window_size: attention window (7 for the 224 models, 12 for the 384 ones).
    drop_path_rate: stochastic depth at the last block, linear from 0 over blocks.
    attention_impl: implementation of ``vit_jax.kernels.window_attention``.
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  attention_impl: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(
          f"Swin with patch size {p} needs image sides divisible by {p}; got "
          f"{height}x{width}. (Any multiple of {p} works: stages pad their maps to "
          "a multiple of the window.)")
    return height // p, width // p

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    layers.check_per_stage(self, ("num_heads",), len(self.depths))
    self.patch_grid(images.shape[1], images.shape[2])
    size = layers.to_2tuple(self.image_size)
    windows = stage_windows((size[0] // self.patch_size, size[1] // self.patch_size),
                            layers.to_2tuple(self.window_size), len(self.depths))

    x = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=dtype, param_dtype=param_dtype, name="patch_embed")(
                    images.astype(dtype))
    x = layers.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                     name="patch_norm")(x)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      start = sum(self.depths[:i])
      window, shift = windows[i]
      x = SwinStage(dim=self.embed_dim * 2 ** i, depth=depth, num_heads=heads,
                    window=window, shift=shift, downsample=i > 0,
                    drop_path_rates=rates[start:start + depth], mlp_ratio=self.mlp_ratio,
                    attention_impl=self.attention_impl, dtype=dtype,
                    param_dtype=param_dtype, name=f"stages_{i}")(x, train=train)
      self.sow("intermediates", f"stage_{i}", x)

    x = layers.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name="norm")(x)
    return layers.classifier_head(self, jnp.mean(x, axis=(1, 2)), self.num_classes,
                                  kernel_init=layers.head_init(self.head_zeroinit),
                                  dtype=dtype, param_dtype=param_dtype)


@register_timm_converter("swin")
def convert_timm_swin(state: StateDict, model: SwinTransformer) -> dict:
  """timm ``SwinTransformer`` state dict (timm's layout) -> Swin params."""
  # Buffers that old checkpoints stored; both are recomputed here.
  state.skip(lambda k: k.endswith(("relative_position_index", "attn_mask")))
  params = {"patch_embed": state.conv("patch_embed.proj"),
            "patch_norm": state.norm("patch_embed.norm"),
            "norm": state.norm("norm")}
  for i, (depth, heads) in enumerate(zip(model.depths, model.num_heads)):
    stage = {}
    if i > 0:
      stage["downsample"] = {
          "norm": state.norm(f"layers.{i}.downsample.norm"),
          "reduction": state.linear(f"layers.{i}.downsample.reduction", bias=False)}
    for j in range(depth):
      prefix = f"layers.{i}.blocks.{j}"
      stage[f"blocks_{j}"] = {
          "norm1": state.norm(f"{prefix}.norm1"),
          "attn": layers.timm_attention_params(state, f"{prefix}.attn", heads),
          "relative_position_bias": {"relative_position_bias_table": state.take(
              f"{prefix}.attn.relative_position_bias_table")},
          "norm2": state.norm(f"{prefix}.norm2"),
          "mlp": layers.timm_mlp_params(state, f"{prefix}.mlp"),
      }
    params[f"stages_{i}"] = stage
  if model.num_classes:
    params["head"] = state.linear("head.fc")
  return params


# timm's registered Swin v1 models: (embed_dim, depths, num_heads, window, resolution).
VARIANTS = {
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_large_patch4_window7_224": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swin_large_patch4_window12_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}


def _register_variants():
  for name, (dim, depths, heads, window, res) in VARIANTS.items():
    defaults = dict(embed_dim=dim, depths=depths, num_heads=heads, window_size=window,
                    image_size=res)
    register_variant(name, SwinTransformer, defaults, family="swin", image_size=res,
                     doc=f"Swin v1 {name} (timm).")


_register_variants()
