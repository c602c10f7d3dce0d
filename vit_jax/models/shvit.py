"""SHViT (Yun & Ro, CVPR 2024): single-head attention on a slice of the channels.

"SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design". A 16x
patchify stem, three stages; each block is a residual depthwise ConvBN, an optional
single-head self-attention mixer, and a residual FFN. The mixer normalises only the
first ``partial_dim`` channels (GroupNorm, one group), attends over all tokens with one
head on them, concatenates the untouched channels back and projects. The downsampling
between stages reuses EfficientViT's macro design (residual dw conv + FFN, patch
merging with squeeze-excite, residual dw conv + FFN).

Numerically this matches timm's ``timm.models.shvit`` in eval mode
(tests/test_shvit.py); conv + BatchNorm pairs stay unfused. BatchNorm running
statistics live in the ``batch_stats`` collection.

Parameter layout::

  patch_embed_{0..3}/{conv,bn}                  four 3x3 stride-2 ConvBN, ReLU between
  stages_{i}_downsample/{res1_dw, res1_ffn, patchmerge, res2_dw, res2_ffn}
                                                (where the width changes)
  stages_{i}_blocks_{j}/{conv, mixer/{pre_norm, qkv, proj}, ffn/{pw1, pw2}}
  head/{bn,linear}                              BatchNorm + Linear (num_classes > 0)

Any input size works (attention is global). Stages sow ``stage_{i}`` (NHWC) and the
pooled features ``features``.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import layers
from vit_jax.models.convert import StateDict, Variables, register_timm_converter
from vit_jax.models.efficientvit_msra import ConvMlp, Subsample, VariablesBuilder
from vit_jax.models.registry import register_variant

Array = Any


class SingleHeadAttention(nn.Module):
  """SHSA: GroupNorm + one attention head on the first ``partial_dim`` channels.

  The remaining channels pass through unchanged; ReLU and a 1x1 ConvBN (starting at
  zero) mix everything back together.
  """
  qk_dim: int
  partial_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    batch, height, width, dim = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if not 0 < self.partial_dim <= dim:
      raise ValueError(f"SHViT attention: partial_dim={self.partial_dim} must be in "
                       f"(0, {dim}]")
    x1, x2 = x[..., :self.partial_dim], x[..., self.partial_dim:]
    x1 = layers.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False,
                      name="pre_norm", **kw)(x1)
    qkv = layers.ConvBN(2 * self.qk_dim + self.partial_dim, name="qkv", **kw)(
        x1, train=train)
    q, k, v = jnp.split(qkv, [self.qk_dim, 2 * self.qk_dim], axis=-1)
    q, k, v = (t.reshape(batch, height * width, -1) for t in (q, k, v))
    logits = jnp.einsum("bnd,bmd->bnm", q, k).astype(jnp.float32) * self.qk_dim ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    x1 = jnp.einsum("bnm,bmd->bnd", weights, v).reshape(batch, height, width, -1)
    x = nn.relu(jnp.concatenate([x1, x2], axis=-1))
    return layers.ConvBN(dim, bn_scale_init=0.0, name="proj", **kw)(x, train=train)


class SHViTBlock(nn.Module):
  """Residual depthwise ConvBN, residual single-head attention (optional), residual FFN."""
  qk_dim: int
  partial_dim: int
  attention: bool = True
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    drop = lambda y: layers.DropPath(self.drop_path_rate)(y, train=train)
    x = x + drop(layers.ConvBN(dim, 3, groups=dim, bn_scale_init=0.0, name="conv", **kw)(
        x, train=train))
    if self.attention:
      x = x + drop(SingleHeadAttention(self.qk_dim, self.partial_dim, name="mixer", **kw)(
          x, train=train))
    return x + drop(ConvMlp(2 * dim, name="ffn", **kw)(x, train=train))


class SHViT(nn.Module):
  """SHViT classifier. NHWC images -> float32 logits (or pooled features).

  Attributes:
    embed_dims, partial_dims, qk_dims, depths: per stage (three stages); a stage
      whose width differs from the previous one starts by downsampling 2x.
    mixers: per stage, "s" (single-head attention) or "i" (none: conv + FFN only).
    num_classes: 0 returns the pooled features (no head BatchNorm).
    head_dropout_rate: dropout before the classifier; drop_path_rate: stochastic depth
      on the blocks' residual branches, rising linearly over blocks (timm: none).
  """
  num_classes: int = 1000
  embed_dims: Sequence[int] = (128, 256, 384)
  partial_dims: Sequence[int] = (32, 64, 96)
  qk_dims: Sequence[int] = (16, 16, 16)
  depths: Sequence[int] = (1, 2, 3)
  mixers: Sequence[str] = ("s", "s", "s")
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
    stages = len(self.embed_dims)
    layers.check_per_stage(self, ("partial_dims", "qk_dims", "depths", "mixers"), stages)
    unknown = [m for m in self.mixers if m not in ("s", "i")]
    if unknown:
      raise ValueError(f"SHViT mixers are 's' (attention) or 'i' (none), got {unknown}")

    dim = self.embed_dims[0]
    x = images.astype(dtype)
    for i, width in enumerate((dim // 8, dim // 4, dim // 2, dim)):
      x = layers.ConvBN(width, 3, strides=2, name=f"patch_embed_{i}", **kw)(x, train=train)
      if i < 3:
        x = nn.relu(x)
    rates = layers.stochastic_depth_rates(self.drop_path_rate, sum(self.depths))
    block = 0
    for i in range(stages):
      if self.embed_dims[i] != x.shape[-1]:
        x = Subsample(self.embed_dims[i], name=f"stages_{i}_downsample", **kw)(
            x, train=train)
      for j in range(self.depths[i]):
        x = SHViTBlock(qk_dim=self.qk_dims[i], partial_dim=self.partial_dims[i],
                       attention=self.mixers[i] == "s", drop_path_rate=rates[block],
                       name=f"stages_{i}_blocks_{j}", **kw)(x, train=train)
        block += 1
      self.sow("intermediates", f"stage_{i}", x)

    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "features", x)
    if not self.num_classes:
      return x.astype(jnp.float32)
    x = nn.Dropout(self.head_dropout_rate)(x, deterministic=not train)  # before the BN
    x = layers.NormLinear(self.num_classes, name="head", **kw)(x, train=train)
    return x.astype(jnp.float32)


# ---------------------------------------------------------------- variants (timm names)

VARIANTS = {
    "shvit_s1": dict(embed_dims=(128, 224, 320), depths=(2, 4, 5),
                     partial_dims=(32, 48, 68), mixers=("i", "s", "s")),
    "shvit_s2": dict(embed_dims=(128, 308, 448), depths=(2, 4, 5),
                     partial_dims=(32, 66, 96), mixers=("i", "s", "s")),
    "shvit_s3": dict(embed_dims=(192, 352, 448), depths=(3, 5, 5),
                     partial_dims=(48, 75, 96), mixers=("i", "s", "s")),
    "shvit_s4": dict(embed_dims=(224, 336, 448), depths=(4, 7, 6),
                     partial_dims=(48, 72, 96), mixers=("i", "s", "s")),
}
# timm's pretrained resolution: 256 for s4, 224 for the others.
RESOLUTIONS = {"shvit_s1": 224, "shvit_s2": 224, "shvit_s3": 224, "shvit_s4": 256}


def _register_variants():
  for name, defaults in VARIANTS.items():
    res = RESOLUTIONS[name]
    register_variant(name, SHViT, defaults, family="shvit", image_size=res,
                     doc=f"timm's {name} (pretrained at {res}x{res}).")


_register_variants()


# ---------------------------------------------------------------- timm conversion

@register_timm_converter("shvit")
def convert_timm_shvit(state: StateDict, model: SHViT) -> Variables:
  """timm ``SHViT`` state dict -> ``{"params", "batch_stats"}``."""
  out = VariablesBuilder(state)
  for i in range(4):
    out.conv_bn([f"patch_embed_{i}"], f"patch_embed.{2 * i}", conv="c")
  prev = model.embed_dims[0]
  for i, dim in enumerate(model.embed_dims):
    if dim != prev:
      src, dst = f"stages.{i}.downsample", f"stages_{i}_downsample"
      for res, index in (("res1", 0), ("res2", 3)):
        out.conv_bn([dst, f"{res}_dw"], f"{src}.{index}.m", conv="c")
        for pw in ("pw1", "pw2"):
          out.conv_bn([dst, f"{res}_ffn", pw], f"{src}.{index + 1}.m.{pw}", conv="c")
      for conv in ("conv1", "conv2", "conv3"):
        out.conv_bn([dst, "patchmerge", conv], f"{src}.2.{conv}", conv="c")
      out.squeeze_excite([dst, "patchmerge", "se"], f"{src}.2.se")
    prev = dim
    for j in range(model.depths[i]):
      src, dst = f"stages.{i}.blocks.{j}", f"stages_{i}_blocks_{j}"
      out.conv_bn([dst, "conv"], f"{src}.conv.m", conv="c")
      if model.mixers[i] == "s":
        out.param([dst, "mixer", "pre_norm"], state.norm(f"{src}.mixer.m.pre_norm"))
        out.conv_bn([dst, "mixer", "qkv"], f"{src}.mixer.m.qkv", conv="c")
        out.conv_bn([dst, "mixer", "proj"], f"{src}.mixer.m.proj.1", conv="c")
      for pw in ("pw1", "pw2"):
        out.conv_bn([dst, "ffn", pw], f"{src}.ffn.m.{pw}", conv="c")
  if model.num_classes:
    out.norm_linear(["head"], "head", "l")
  return out.variables()
