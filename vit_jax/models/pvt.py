"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021), as the official code builds it.

Not in timm. Reference: whai362/PVT, ``classification/pvt.py`` (``pvt_tiny`` ...
``pvt_large``). Four stages with strides 4, 8, 16, 32; each stage is

- a non-overlapping patch embedding (conv with kernel = stride = 4, then 2) + LayerNorm,
- a learned position embedding per stage (the last stage also has a class token, and
  its position embedding a slot for it),
- pre-norm blocks with spatial-reduction attention (SRA: keys and values from the map
  shrunk by an ``sr x sr`` stride-``sr`` conv + LayerNorm; ratios 8, 4, 2, 1) and a
  plain MLP.

The class token after the final LayerNorm feeds the head. The SRA is the one PVT v2
uses (``vit_jax.models.pvt_v2.spatial_reduction_attention``), which is checked
against timm there.

Parameter tree::

  stages_{i}/patch_embed/{proj,norm}
  stages_{i}/pos_embed              [1, tokens, dim], the official token layout
  stages_3/cls_token
  stages_{i}/blocks_{j}/norm1, sr/{conv,norm}, attn/{query,key,value,out},
                        norm2, mlp/{Dense_0,Dense_1}
  norm, head

Sown: ``stage_{i}``, each stage's output as an NHWC map (the last without the class
token, before the final norm), and ``features`` (the normalised class token).

Input sizes: sides must be multiples of 32 (the patch embeddings have no padding, and
the official code would silently drop the border otherwise). The position embeddings
are learned for ``image_size``; at any other size they are resized bilinearly to the
stage's grid, as the official code does (``F.interpolate(mode="bilinear")``,
``align_corners=False``, no anti-aliasing); the class token's slot is kept as is.
(One deliberate difference: the official code skips the resize at stage 0 whenever the
token *count* matches, e.g. 112x448 for a 224 model, and then adds the 56x56 table to
a 28x112 grid token by token; here any grid that differs is resized.)
"""

from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers
from vit_jax.models.convert import StateDict
from vit_jax.models.official import register_official_converter
from vit_jax.models.pvt_v2 import (conv_init, dense_init, spatial_reduction_attention,
                                   timm_sra)
from vit_jax.models.registry import register_variant

Array = Any

# Depths of the official variants; widths, heads, MLP and SR ratios are shared.
VARIANTS = {
    "pvt_tiny": (2, 2, 2, 2),
    "pvt_small": (3, 4, 6, 3),
    "pvt_medium": (3, 4, 18, 3),
    "pvt_large": (3, 8, 27, 3),
}


def bilinear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``[size_out, size_in]`` weights of PyTorch's bilinear ``align_corners=False``.

  Output ``i`` samples input position ``(i + 0.5) * size_in / size_out - 0.5``
  (clamped at 0) by linear interpolation between its two neighbours.
  """
  matrix = np.zeros((size_out, size_in), np.float64)
  scale = size_in / size_out
  for i in range(size_out):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    lo = min(int(np.floor(src)), size_in - 1)
    hi = min(lo + 1, size_in - 1)
    frac = src - lo
    matrix[i, lo] += 1.0 - frac
    matrix[i, hi] += frac
  return matrix.astype(np.float32)


def resize_pos_embed(pos_embed: Array, grid_in: tuple[int, int],
                     grid_out: tuple[int, int]) -> Array:
  """Bilinearly resizes ``[1, gh * gw, C]`` grid embeddings to another grid."""
  if tuple(grid_in) == tuple(grid_out):
    return pos_embed
  dim = pos_embed.shape[-1]
  grid = pos_embed.reshape(grid_in + (dim,))
  mh = jnp.asarray(bilinear_resize_matrix(grid_in[0], grid_out[0]), grid.dtype)
  mw = jnp.asarray(bilinear_resize_matrix(grid_in[1], grid_out[1]), grid.dtype)
  grid = jnp.einsum("ph,hwc,qw->pqc", mh, grid, mw)
  return grid.reshape(1, grid_out[0] * grid_out[1], dim)


class Block(nn.Module):
  """Pre-norm block on tokens: x + SRA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: float
  sr_ratio: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, grid: tuple[int, int], *, train: bool = False) -> Array:
    norm = lambda name: layers.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    y = spatial_reduction_attention(
        norm("norm1")(x), grid, num_heads=self.num_heads, sr_ratio=self.sr_ratio,
        linear=False, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype, train=train)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)
    y = layers.MlpBlock(mlp_dim=int(x.shape[-1] * self.mlp_ratio),
                        dropout_rate=self.dropout_rate, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="mlp")(
                            norm("norm2")(x), train=train)
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class Stage(nn.Module):
  """Patch embedding, position embedding (+ class token), blocks.

  NHWC map in; tokens (class token first, if any) and their grid out.
  """
  dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  patch_size: int
  pos_grid: tuple[int, int]  # the grid the position embedding is learned for
  class_token: bool
  drop_path_rates: Sequence[float]
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, tuple[int, int]]:
    # Non-overlapping patches (kernel = stride, no padding), then LayerNorm.
    x = layers.ConvEmbed(self.dim, self.patch_size, self.patch_size, kernel_init=conv_init,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         name="patch_embed")(x)
    batch, height, width, _ = x.shape
    x = x.reshape(batch, height * width, self.dim)
    init = nn.initializers.truncated_normal(0.02)
    num_pos = self.pos_grid[0] * self.pos_grid[1] + int(self.class_token)
    pos = self.param("pos_embed", init, (1, num_pos, self.dim), self.param_dtype)
    pos = pos.astype(self.dtype)
    if self.class_token:
      cls = self.param("cls_token", init, (1, 1, self.dim), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (batch, 1, 1)), x], axis=1)
      pos = jnp.concatenate(
          [pos[:, :1], resize_pos_embed(pos[:, 1:], self.pos_grid, (height, width))],
          axis=1)
    else:
      pos = resize_pos_embed(pos, self.pos_grid, (height, width))
    x = nn.Dropout(rate=self.dropout_rate)(x + pos, deterministic=not train)
    for j in range(self.depth):
      x = Block(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                sr_ratio=self.sr_ratio, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=self.drop_path_rates[j], dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"blocks_{j}")(
                    x, (height, width), train=train)
    return x, (height, width)


class PyramidVisionTransformer(nn.Module):
  """PVT v1 classifier. Call with NHWC images whose sides are multiples of 32.

  Attributes:
    num_classes: size of the head; 0 returns the normalised class token.
    image_size: the resolution the position embeddings are learned for; other
      (multiple-of-32) sizes resize them bilinearly.
    depths, embed_dims, num_heads, mlp_ratios, sr_ratios: per stage.
    patch_size: of the first patch embedding (the later ones are 2).
    dropout_rate: after the position embedding, attention projection and MLP.
    attention_dropout_rate: on the attention weights.
    drop_path_rate: stochastic depth of the last block, rising linearly from 0.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  patch_size: int = 4
  depths: Sequence[int] = (2, 2, 2, 2)
  embed_dims: Sequence[int] = (64, 128, 320, 512)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def stride(self) -> int:
    return self.patch_size * 2 ** (len(self.depths) - 1)

  def check_size(self, height: int, width: int) -> None:
    """A ValueError naming the constraint unless both sides are multiples of 32."""
    s = self.stride()
    strides = [self.patch_size] + [2] * (len(self.depths) - 1)
    if height % s or width % s or height < s or width < s:
      raise ValueError(
          f"PVT needs image sides that are positive multiples of {s} (patch embeddings "
          f"of strides {', '.join(map(str, strides))} without padding); got "
          f"{height}x{width}. "
          f"Resize or pad the input, e.g. to {max(s, height // s * s)}x"
          f"{max(s, width // s * s)}.")

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    num_stages = len(self.depths)
    layers.check_per_stage(self, ("embed_dims", "num_heads", "mlp_ratios", "sr_ratios"),
                           num_stages)
    layers.check_images(images)
    learned = layers.to_2tuple(self.image_size)
    if learned[0] % self.stride() or learned[1] % self.stride():
      raise ValueError(
          f"image_size={self.image_size} is not a multiple of {self.stride()}")
    self.check_size(images.shape[1], images.shape[2])

    x = images.astype(dtype)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    start = 0
    for i in range(num_stages):
      reduction = self.patch_size * 2 ** i
      last = i == num_stages - 1
      tokens, (height, width) = Stage(
          dim=self.embed_dims[i], depth=self.depths[i], num_heads=self.num_heads[i],
          mlp_ratio=self.mlp_ratios[i], sr_ratio=self.sr_ratios[i],
          patch_size=self.patch_size if i == 0 else 2,
          pos_grid=(learned[0] // reduction, learned[1] // reduction), class_token=last,
          drop_path_rates=rates[start:start + self.depths[i]],
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, dtype=dtype,
          param_dtype=param_dtype, name=f"stages_{i}")(x, train=train)
      start += self.depths[i]
      x = (tokens[:, 1:] if last else tokens).reshape(
          tokens.shape[0], height, width, self.embed_dims[i])
      self.sow("intermediates", f"stage_{i}", x)

    x = layers.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                     name="norm")(tokens)[:, 0]
    return layers.classifier_head(self, x, self.num_classes, kernel_init=dense_init,
                                  dtype=dtype, param_dtype=param_dtype)


@register_official_converter("pvt")
def convert_official_pvt(state: StateDict, model: PyramidVisionTransformer) -> dict:
  """whai362/PVT ``classification/pvt.py`` state dict -> parameters.

  Official names: ``patch_embed{1..4}``, ``pos_embed{1..4}``, ``block{1..4}.{j}``
  (``attn.q``/``kv``/``proj``/``sr``/``norm``, ``mlp.fc1``/``fc2``), ``cls_token``,
  ``norm``, ``head``.
  """
  params = {"norm": state.norm("norm")}
  for i, depth in enumerate(model.depths):
    n = i + 1
    stage = {"patch_embed": {"proj": state.conv(f"patch_embed{n}.proj"),
                             "norm": state.norm(f"patch_embed{n}.norm")},
             "pos_embed": state.take(f"pos_embed{n}")}
    if i == len(model.depths) - 1:
      stage["cls_token"] = state.take("cls_token")
    for j in range(depth):
      p = f"block{n}.{j}"
      stage[f"blocks_{j}"] = {
          "norm1": state.norm(f"{p}.norm1"),
          **timm_sra(state, f"{p}.attn", model.num_heads[i], model.sr_ratios[i] > 1),
          "norm2": state.norm(f"{p}.norm2"),
          "mlp": layers.timm_mlp_params(state, f"{p}.mlp"),
      }
    params[f"stages_{i}"] = stage
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


def _register_variants():
  for name, depths in VARIANTS.items():
    register_variant(name, PyramidVisionTransformer, {"depths": depths}, family="pvt",
                     image_size=224, doc=f"Official {name} (PVT v1), 224x224.")


_register_variants()
