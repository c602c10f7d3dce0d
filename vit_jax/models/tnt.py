"""TNT, Transformer in Transformer (Han et al., 2021): pixel-level inside patch-level.

Every 16x16 patch is turned into a 4x4 grid of "pixel" tokens (a 7x7 stride-4 conv over
the patch) that an inner transformer processes within the patch; after each inner block
the patch's pixel tokens are flattened, normalised and projected into the patch token,
which the outer transformer then processes across patches, ViT-style, with a class
token. Matches timm's ``tnt_s_patch16_224`` and ``tnt_b_patch16_224`` (not the
``legacy`` layout). Both transformers are ``vit.Encoder1DBlock`` with PyTorch's LayerNorm
epsilon (1e-5) and no query/key/value biases.

Parameter tree::

  pixel_embed, pixel_pos          conv 7x7/4 over each patch; pixel position embedding
  norm1_proj, proj, norm2_proj    pixel tokens of a patch -> its initial patch token
  cls, patch_pos                  class token; patch position embedding
  encoderblock_{i}/inner          pixel-level block (within each patch)
  encoderblock_{i}/norm1_proj, proj, norm2_proj   pixel tokens -> added to patch token
  encoderblock_{i}/outer          patch-level block
  norm, head

Intermediates: ``block_{i}`` (patch tokens after block i, class token first) and
``features`` (the normalised class token).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import layers, vit
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_variant

Array = Any
LN_EPS = 1e-5  # timm's TNT uses PyTorch's default LayerNorm


class TNTBlock(nn.Module):
  """Inner block on pixel tokens, pixel -> patch projection, outer block on patches."""
  inner_heads: int
  outer_heads: int
  mlp_ratio: float
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array, patches: Array, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda dim, heads, ratio, name: vit.Encoder1DBlock(
        mlp_dim=int(dim * ratio), num_heads=heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, norm_epsilon=LN_EPS,
        qkv_bias=self.qkv_bias, name=name, **kw)
    inner_dim, outer_dim = pixels.shape[-1], patches.shape[-1]
    pixels = block(inner_dim, self.inner_heads, 4.0, "inner")(pixels, train=train)

    batch, num_tokens = patches.shape[:2]
    y = pixels.reshape(batch, num_tokens - 1, -1)
    y = layers.LayerNorm(epsilon=LN_EPS, name="norm1_proj", **kw)(y)
    y = layers.Dense(outer_dim, use_bias=False, name="proj", **kw)(y)
    y = layers.LayerNorm(epsilon=LN_EPS, name="norm2_proj", **kw)(y)
    patches = jnp.concatenate([patches[:, :1], patches[:, 1:] + y], axis=1)
    patches = block(outer_dim, self.outer_heads, self.mlp_ratio, "outer")(patches,
                                                                          train=train)
    return pixels, patches


class TNT(nn.Module):
  """TNT classifier. Call with NHWC images; returns float32 logits (or features).

  Attributes:
    hidden_size: width of the patch (outer) tokens; inner_dim: of the pixel tokens.
    first_stride: stride of the pixel conv; a patch becomes ceil(p/stride)^2 pixels.
    num_classes: 0 returns the normalised class token.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 384
  inner_dim: int = 24
  num_layers: int = 12
  inner_heads: int = 4
  outer_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  first_stride: int = 4
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    p = self.patch_size
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(
          f"this TNT's position embeddings are built for {self.image_size}x"
          f"{self.image_size} images; got {height}x{width}. Create the model with "
          "image_size=<side> (square inputs only).")
    if height % p:
      raise ValueError(f"TNT with patch size {p} needs image sides divisible by {p}; "
                       f"got {height}x{width}")
    return height // p, width // p

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    layers.check_images(images)
    gh, gw = self.patch_grid(images.shape[1], images.shape[2])
    batch, p, channels = images.shape[0], self.patch_size, images.shape[3]
    num_patches = gh * gw

    # Pixel tokens: each patch on its own through a 7x7 conv (timm: unfold + conv).
    x = images.astype(dtype).reshape(batch, gh, p, gw, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch * num_patches, p, p, channels)
    x = nn.Conv(self.inner_dim, (7, 7), strides=(self.first_stride,) * 2,
                padding=((3, 3), (3, 3)), name="pixel_embed", **kw)(x)
    side = math.ceil(p / self.first_stride)
    pixel_pos = self.param("pixel_pos", nn.initializers.normal(stddev=0.02),
                           (1, side, side, self.inner_dim), param_dtype)
    pixels = (x + pixel_pos.astype(dtype)).reshape(batch * num_patches, side * side,
                                                  self.inner_dim)

    patches = pixels.reshape(batch, num_patches, -1)
    patches = layers.LayerNorm(epsilon=LN_EPS, name="norm1_proj", **kw)(patches)
    patches = layers.Dense(self.hidden_size, name="proj", **kw)(patches)
    patches = layers.LayerNorm(epsilon=LN_EPS, name="norm2_proj", **kw)(patches)
    cls = self.param("cls", nn.initializers.normal(stddev=0.02), (1, 1, self.hidden_size),
                     param_dtype)
    patches = jnp.concatenate([jnp.tile(cls.astype(dtype), [batch, 1, 1]), patches], axis=1)
    patch_pos = self.param("patch_pos", nn.initializers.normal(stddev=0.02),
                           (1, num_patches + 1, self.hidden_size), param_dtype)
    patches = nn.Dropout(rate=self.dropout_rate)(patches + patch_pos.astype(dtype),
                                                 deterministic=not train)

    for i, rate in enumerate(layers.stochastic_depth_rates(self.drop_path_rate,
                                                           self.num_layers)):
      pixels, patches = TNTBlock(
          inner_heads=self.inner_heads, outer_heads=self.outer_heads,
          mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=rate,
          name=f"encoderblock_{i}", **kw)(pixels, patches, train=train)
      self.sow("intermediates", f"block_{i}", patches)

    x = layers.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(patches)[:, 0]
    return layers.classifier_head(self, x, self.num_classes, **kw)


@register_timm_converter("tnt")
def convert_timm_tnt(state: StateDict, model: TNT) -> dict:
  """timm ``TNT`` state dict (current layout, not ``legacy``) -> TNT params."""
  params = {
      "pixel_embed": state.conv("pixel_embed.proj"),
      # timm keeps the pixel position embedding as an NCHW map.
      "pixel_pos": state.take("pixel_pos").transpose(0, 2, 3, 1),
      "norm1_proj": state.norm("norm1_proj"), "proj": state.linear("proj"),
      "norm2_proj": state.norm("norm2_proj"), "cls": state.take("cls_token"),
      "patch_pos": state.take("patch_pos"), "norm": state.norm("norm"),
  }

  def encoder_block(prefix, norm1, attn, norm2, mlp, heads):
    return {"LayerNorm_0": state.norm(f"{prefix}.{norm1}"),
            "MultiHeadDotProductAttention_1": layers.timm_attention_params(
                state, f"{prefix}.{attn}", heads, linears=layers.QK_V,
                qkv_bias=model.qkv_bias),
            "LayerNorm_2": state.norm(f"{prefix}.{norm2}"),
            "MlpBlock_3": layers.timm_mlp_params(state, f"{prefix}.{mlp}")}

  for i in range(model.num_layers):
    prefix = f"blocks.{i}"
    params[f"encoderblock_{i}"] = {
        "inner": encoder_block(prefix, "norm_in", "attn_in", "norm_mlp_in", "mlp_in",
                               model.inner_heads),
        "norm1_proj": state.norm(f"{prefix}.norm1_proj"),
        "proj": state.linear(f"{prefix}.proj", bias=False),
        "norm2_proj": state.norm(f"{prefix}.norm2_proj"),
        "outer": encoder_block(prefix, "norm_out", "attn_out", "norm_mlp", "mlp",
                               model.outer_heads),
    }
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


VARIANTS = {
    "s": dict(hidden_size=384, inner_dim=24, outer_heads=6),
    "b": dict(hidden_size=640, inner_dim=40, outer_heads=10),
}


def _register_variants():
  for size, dims in VARIANTS.items():
    name = f"tnt_{size}_patch16_224"
    register_variant(name, TNT, dims, family="tnt", image_size=224,
                     doc=f"TNT-{size.upper()} with 16x16 patches at 224x224.")


_register_variants()
