"""CrossViT (Chen et al., 2021): two ViT branches fused by class-token cross-attention.

Each branch tokenizes the image with its own patch size (12 and 16 in every released
model; the 16-pixel branch sees the image resized to 224/240 of its side), runs its own
transformer blocks, and then swaps information through its class token only: the small
branch's class token is projected to the large branch's width, attends (as the only
query) over the large branch's patch tokens, is projected back, and vice versa. The
logits are the mean of the two branches' heads. The dagger (``*_dagger_*``) variants
tokenize with three convolutions instead of one. Matches timm's ``crossvit`` models.

Parameter tree::

  patch_embed_{b}                 conv (or Conv_0..2 for the dagger stem)
  cls_{b}, pos_embedding_{b}      class token and learned position embedding of branch b
  block_{i}/blocks_{b}/encoderblock_{j}   ViT blocks of branch b (vit.Encoder1DBlock)
  block_{i}/proj_{b}, revert_proj_{b}     LayerNorm -> GELU -> Dense between widths
  block_{i}/fusion_{b}[_{k}]              cross-attention block (LayerNorm, attention)
  norm_{b}, head_{b}

Intermediates: ``block_{i}/branch_{b}`` (all tokens of branch b after multi-scale
block i, class token first) and ``features`` (the two class tokens, concatenated).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, vit
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any


def _torch_cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out, in]`` weights of PyTorch's bicubic resize (a=-0.75, align_corners=False).

  ``jax.image.resize`` uses a=-0.5 and antialiases when shrinking, so it does not
  reproduce timm's ``F.interpolate(..., mode="bicubic")``; this matrix does. Source
  positions and weights are computed in float32 like PyTorch's CPU kernel: in float64
  the fractional offsets of far pixels differ by ~1e-5, which shows in the features.
  """
  f32 = np.float32
  a = f32(-0.75)
  near = lambda t: ((a + f32(2)) * t - (a + f32(3))) * t * t + f32(1)  # |t| <= 1
  far = lambda t: ((a * t - f32(5) * a) * t + f32(8) * a) * t - f32(4) * a  # 1 < |t| < 2
  matrix = np.zeros((out_size, in_size), np.float32)
  scale = f32(in_size) / f32(out_size)
  for i in range(out_size):
    src = scale * f32(i + 0.5) - f32(0.5)  # not clamped at 0 for cubic, as in PyTorch
    base = int(np.floor(src))
    t = min(max(src - f32(base), f32(0)), f32(1))
    weights = (far(t + f32(1)), near(t), near(f32(1) - t), far(f32(2) - t))
    for offset, weight in zip((-1, 0, 1, 2), weights):
      matrix[i, min(max(base + offset, 0), in_size - 1)] += weight
  return matrix


def resize_bicubic_torch(images: Array, height: int, width: int) -> Array:
  """NHWC bicubic resize with PyTorch's kernel and edge handling (no antialiasing)."""
  mh = jnp.asarray(_torch_cubic_matrix(images.shape[1], height), images.dtype)
  mw = jnp.asarray(_torch_cubic_matrix(images.shape[2], width), images.dtype)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


class ConvStem(nn.Module):
  """The dagger tokenizer: conv 7x7/4 -> ReLU -> conv 3x3 -> ReLU -> conv 3x3."""
  features: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # (kernel, stride, padding) of the 2nd and 3rd convs reach a total stride of 12 or 16.
    second = {12: (3, 3, 0), 16: (3, 2, 1)}[self.patch_size]
    third = {12: (3, 1, 1), 16: (3, 2, 1)}[self.patch_size]
    specs = [(self.features // 4, 7, 4, 3), (self.features // 2,) + second,
             (self.features,) + third]
    for i, (features, kernel, stride, pad) in enumerate(specs):
      if i:
        x = nn.relu(x)
      x = nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"Conv_{i}")(x)
    return x


class Projection(nn.Module):
  """LayerNorm -> GELU -> Dense: moves a class token between the branch widths."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    return layers.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="Dense_0")(layers.gelu(x))


class CrossAttentionBlock(nn.Module):
  """The class token (first token) attends over all tokens; returns the new class token."""
  num_heads: int
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    y = layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    y = layers.MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_0")(y[:, :1], y, train=train)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    return x[:, :1] + layers.DropPath(self.drop_path_rate)(y, train=train)


class BranchBlocks(nn.Module):
  """One branch's ViT blocks inside a multi-scale block."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  drop_path_rates: Sequence[float]
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    for j in range(self.num_layers):
      x = vit.Encoder1DBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          drop_path_rate=self.drop_path_rates[j], dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"encoderblock_{j}")(x, train=train)
    return x


class MultiScaleBlock(nn.Module):
  """Per-branch ViT blocks, then class-token fusion of every branch with the next one."""
  hidden_sizes: Sequence[int]
  depth: Sequence[int]  # blocks per branch, then the number of fusion blocks
  num_heads: Sequence[int]
  mlp_ratios: Sequence[float]
  drop_path_rates: Sequence[float]
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: list[Array], *, train: bool = False) -> list[Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(xs)
    outs = [BranchBlocks(
        num_layers=self.depth[b], mlp_dim=int(self.hidden_sizes[b] * self.mlp_ratios[b]),
        num_heads=self.num_heads[b], drop_path_rates=self.drop_path_rates,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        name=f"blocks_{b}", **kw)(x, train=train) for b, x in enumerate(xs)]

    fused = []
    num_fusion = max(self.depth[-1], 1)  # 0 means one block (timm's naming differs)
    for b in range(n):
      other = (b + 1) % n
      cls = Projection(self.hidden_sizes[other], name=f"proj_{b}", **kw)(outs[b][:, :1])
      y = jnp.concatenate([cls, outs[other][:, 1:]], axis=1)
      for k in range(num_fusion):
        y = CrossAttentionBlock(
            num_heads=self.num_heads[other], dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            drop_path_rate=self.drop_path_rates[-1],
            name=f"fusion_{b}" if self.depth[-1] == 0 else f"fusion_{b}_{k}", **kw)(
                y, train=train)
      cls = Projection(self.hidden_sizes[b], name=f"revert_proj_{b}", **kw)(y[:, :1])
      fused.append(jnp.concatenate([cls, outs[b][:, 1:]], axis=1))
    for b, x in enumerate(fused):
      self.sow("intermediates", f"branch_{b}", x)
    return fused


class CrossViT(nn.Module):
  """CrossViT classifier. Call with NHWC images; returns float32 logits (or features).

  Attributes:
    image_size: the input side; branch b sees ``int(image_size * image_scale[b])``.
    patch_size, hidden_size, num_heads: one value per branch.
    depth: per multi-scale block, ``(blocks of branch 0, blocks of branch 1, fusion
      blocks)``; 0 fusion blocks means one cross-attention block (all released models).
    mlp_ratio: per branch (a third value, unused, is kept for timm's configs).
    multi_conv: the dagger three-convolution tokenizer.
    crop_scale: centre-crop instead of resizing to reach a branch's scaled size.
    num_classes: 0 returns the concatenated class tokens (timm's pre-logits).
  """
  num_classes: int = 1000
  image_size: int = 240
  image_scale: Sequence[float] = (1.0, 224 / 240)
  patch_size: Sequence[int] = (12, 16)
  hidden_size: Sequence[int] = (192, 384)
  depth: Sequence[Sequence[int]] = ((1, 4, 0),) * 3
  num_heads: Sequence[int] = (6, 6)
  mlp_ratio: Sequence[float] = (4.0, 4.0, 1.0)
  multi_conv: bool = False
  crop_scale: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def branch_sizes(self) -> list[int]:
    return [int(self.image_size * s) for s in self.image_scale]

  def _check_input(self, height: int, width: int) -> None:
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(
          f"this CrossViT's position embeddings are built for {self.image_size}x"
          f"{self.image_size} images; got {height}x{width}. Create the model with "
          f"image_size={height} (square inputs only).")
    for b, (size, patch) in enumerate(zip(self.branch_sizes(), self.patch_size)):
      if self.multi_conv and patch not in (12, 16):
        raise ValueError(f"the dagger stem exists for patch sizes 12 and 16, got {patch}")
      if size % patch:
        raise ValueError(
            f"CrossViT branch {b} resizes {self.image_size}x{self.image_size} images to "
            f"{size}x{size}, which is not divisible by its patch size {patch}; pick an "
            f"image_size for which int(image_size * {self.image_scale[b]:.4f}) is a "
            f"multiple of {patch} (e.g. 240 or 120 for the released scales).")

  def _embed(self, images: Array, b: int, dtype, param_dtype) -> Array:
    size = self.branch_sizes()[b]
    x = images
    if size != images.shape[1]:
      if self.crop_scale and size <= images.shape[1]:
        top = int(round((images.shape[1] - size) / 2.))
        x = x[:, top:top + size, top:top + size]
      else:
        x = resize_bicubic_torch(x, size, size)
    hidden, patch = self.hidden_size[b], self.patch_size[b]
    if self.multi_conv:
      x = ConvStem(hidden, patch, dtype=dtype, param_dtype=param_dtype,
                   name=f"patch_embed_{b}")(x)
    else:
      x = nn.Conv(hidden, (patch, patch), strides=(patch, patch), padding="VALID",
                  dtype=dtype, param_dtype=param_dtype, name=f"patch_embed_{b}")(x)
    x = x.reshape(x.shape[0], -1, hidden)
    cls = self.param(f"cls_{b}", nn.initializers.normal(stddev=0.02), (1, 1, hidden),
                     param_dtype)
    x = jnp.concatenate([jnp.tile(cls.astype(dtype), [x.shape[0], 1, 1]), x], axis=1)
    pos = self.param(f"pos_embedding_{b}", nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:], param_dtype)
    return x + pos.astype(dtype)

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    self._check_input(images.shape[1], images.shape[2])
    num_branches = len(self.patch_size)
    images = images.astype(dtype)
    xs = [nn.Dropout(rate=self.dropout_rate)(self._embed(images, b, dtype, param_dtype),
                                             deterministic=not train)
          for b in range(num_branches)]

    # timm's schedule: rates over sum(branch-1 blocks + fusion blocks); block i takes the
    # slice of its own depth, fusion the last rate of that slice.
    total = sum(sum(cfg[-2:]) for cfg in self.depth)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, total)
    start = 0
    for i, cfg in enumerate(self.depth):
      span = max(cfg[:-1]) + cfg[-1]
      xs = MultiScaleBlock(
          hidden_sizes=tuple(self.hidden_size), depth=tuple(cfg),
          num_heads=tuple(self.num_heads), mlp_ratios=tuple(self.mlp_ratio),
          drop_path_rates=tuple(rates[start:start + span]) or (0.0,),
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, dtype=dtype,
          param_dtype=param_dtype, name=f"block_{i}")(xs, train=train)
      start += span

    cls = [layers.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                        name=f"norm_{b}")(x[:, 0]) for b, x in enumerate(xs)]
    self.sow("intermediates", "features", jnp.concatenate(cls, axis=-1))
    if not self.num_classes:
      return jnp.concatenate(cls, axis=-1).astype(jnp.float32)
    logits = [layers.Dense(self.num_classes, dtype=dtype, param_dtype=param_dtype,
                           name=f"head_{b}")(x).astype(jnp.float32) for b, x in enumerate(cls)]
    return sum(logits) / num_branches


@register_timm_converter("crossvit")
def convert_timm_crossvit(state: StateDict, model: CrossViT) -> dict:
  """timm ``CrossVit`` state dict -> CrossViT params."""
  n = len(model.patch_size)
  params = {}
  for b in range(n):
    if model.multi_conv:
      params[f"patch_embed_{b}"] = {f"Conv_{i}": state.conv(f"patch_embed.{b}.proj.{2 * i}")
                                    for i in range(3)}
    else:
      params[f"patch_embed_{b}"] = state.conv(f"patch_embed.{b}.proj")
    params[f"cls_{b}"] = state.take(f"cls_token_{b}")
    params[f"pos_embedding_{b}"] = state.take(f"pos_embed_{b}")
    params[f"norm_{b}"] = state.norm(f"norm.{b}")
    if model.num_classes:
      params[f"head_{b}"] = state.linear(f"head.{b}")
  projection = lambda prefix: {"LayerNorm_0": state.norm(f"{prefix}.0"),
                               "Dense_0": state.linear(f"{prefix}.2")}
  for i, cfg in enumerate(model.depth):
    timm_block = f"blocks.{i}"
    block = {}
    for b in range(n):
      block[f"blocks_{b}"] = {
          f"encoderblock_{j}": {
              "LayerNorm_0": state.norm(f"{timm_block}.blocks.{b}.{j}.norm1"),
              "MultiHeadDotProductAttention_1": layers.timm_attention_params(
                  state, f"{timm_block}.blocks.{b}.{j}.attn", model.num_heads[b]),
              "LayerNorm_2": state.norm(f"{timm_block}.blocks.{b}.{j}.norm2"),
              "MlpBlock_3": layers.timm_mlp_params(state, f"{timm_block}.blocks.{b}.{j}.mlp"),
          } for j in range(cfg[b])}
      block[f"proj_{b}"] = projection(f"{timm_block}.projs.{b}")
      block[f"revert_proj_{b}"] = projection(f"{timm_block}.revert_projs.{b}")
      heads = model.num_heads[(b + 1) % n]
      fusions = ([(f"fusion_{b}", f"{timm_block}.fusion.{b}")] if cfg[-1] == 0 else
                 [(f"fusion_{b}_{k}", f"{timm_block}.fusion.{b}.{k}") for k in range(cfg[-1])])
      for ours, theirs in fusions:
        block[ours] = {"LayerNorm_0": state.norm(f"{theirs}.norm1"),
                       "MultiHeadDotProductAttention_0": layers.timm_attention_params(
                           state, f"{theirs}.attn", heads, linears=layers.SEPARATE_QKV)}
    params[f"block_{i}"] = block
  return params


# timm's configurations (all at 240, the 16-pixel branch at 224; dagger: conv stem).
VARIANTS = {
    "tiny": dict(hidden_size=(96, 192), depth=((1, 4, 0),) * 3, num_heads=(3, 3),
                 mlp_ratio=(4.0, 4.0, 1.0)),
    "small": dict(hidden_size=(192, 384), depth=((1, 4, 0),) * 3, num_heads=(6, 6),
                  mlp_ratio=(4.0, 4.0, 1.0)),
    "base": dict(hidden_size=(384, 768), depth=((1, 4, 0),) * 3, num_heads=(12, 12),
                 mlp_ratio=(4.0, 4.0, 1.0)),
    "9": dict(hidden_size=(128, 256), depth=((1, 3, 0),) * 3, num_heads=(4, 4),
              mlp_ratio=(3.0, 3.0, 1.0)),
    "15": dict(hidden_size=(192, 384), depth=((1, 5, 0),) * 3, num_heads=(6, 6),
               mlp_ratio=(3.0, 3.0, 1.0)),
    "18": dict(hidden_size=(224, 448), depth=((1, 6, 0),) * 3, num_heads=(7, 7),
               mlp_ratio=(3.0, 3.0, 1.0)),
}
REGISTERED = [("tiny", False, 240), ("small", False, 240), ("base", False, 240),
              ("9", False, 240), ("15", False, 240), ("18", False, 240),
              ("9", True, 240), ("15", True, 240), ("18", True, 240),
              ("15", True, 408), ("18", True, 408)]


def _register_variants():
  for size, dagger, resolution in REGISTERED:
    name = f"crossvit_{size}{'_dagger' if dagger else ''}_{resolution}"
    scale = {240: 224 / 240, 408: 384 / 408}[resolution]
    defaults = dict(VARIANTS[size], multi_conv=dagger, image_size=resolution,
                    image_scale=(1.0, scale), patch_size=(12, 16))
    register_variant(name, CrossViT, defaults, family="crossvit", image_size=resolution,
                     doc=f"CrossViT-{size}{'†' if dagger else ''} at {resolution}x{resolution}.")


_register_variants()
