"""Vision Transformer (Dosovitskiy et al., 2021), in the vision_transformer layout.

Parameter tree (what ``.npz`` checkpoints of google-research/vision_transformer and
big_vision hold)::

  embedding/{kernel,bias}                        patch embedding, HWIO conv kernel
  cls                                            class token (classifier="token")
  Transformer/posembed_input/pos_embedding       learned position embedding
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1,
                              LayerNorm_2, MlpBlock_3/Dense_{0,1}
  Transformer/encoder_norm
  MAPHead_0/...                                  (classifier="map")
  pre_logits/{kernel,bias}                       (representation_size set)
  head/{kernel,bias}                             (num_classes > 0)

``num_classes=0`` drops the head: the model then returns the pooled features, as in
timm. Per-block token features are sown into the ``intermediates`` collection
as ``Transformer/block_{i}`` (``vit_jax.models.forward_intermediates`` collects them).
"""

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

import numpy as np

from vit_jax.models import layers
from vit_jax.models.convert import StateDict, register_timm_converter
from vit_jax.models.registry import register_model

Array = Any

# Width, depth, MLP width and heads of the standard sizes (ViT paper, DeiT, timm).
VARIANTS = {
    "tiny": dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3),
    "small": dict(hidden_size=384, num_layers=12, mlp_dim=1536, num_heads=6),
    "base": dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12),
    "large": dict(hidden_size=1024, num_layers=24, mlp_dim=4096, num_heads=16),
    "huge": dict(hidden_size=1280, num_layers=32, mlp_dim=5120, num_heads=16),
}
PATCH_SIZES = (8, 14, 16, 32)


def _pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding (``pos_embedding``) to the tokens."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pos_embedding = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                               (1,) + x.shape[1:], self.param_dtype)
    return x + pos_embedding.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  qkv_bias: bool = True  # timm's qkv_bias=False drops only the query/key/value biases

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    norm = lambda name: nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    y = norm("LayerNorm_0")(x)
    y = layers.MultiHeadDotProductAttention(qkv_bias=self.qkv_bias,
        num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name="MultiHeadDotProductAttention_1")(y, train=train)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    x = x + layers.DropPath(self.drop_path_rate)(y, train=train)

    y = norm("LayerNorm_2")(x)
    y = layers.MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                        gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="MlpBlock_3")(y, train=train)
    return x + layers.DropPath(self.drop_path_rate)(y, train=train)


class Encoder(nn.Module):
  """The ``Transformer`` scope: position embedding, blocks and the final norm."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  learned_posemb: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if self.learned_posemb:
      x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    for i, rate in enumerate(layers.stochastic_depth_rates(self.drop_path_rate,
                                                           self.num_layers)):
      x = Encoder1DBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=rate,
          gelu_approximate=self.gelu_approximate, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f"encoderblock_{i}")(x, train=train)
      self.sow("intermediates", f"block_{i}", x)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT classifier. Call with NHWC images; returns float32 logits (or features).

  Attributes:
    num_classes: size of the head; 0 returns the pooled (pre-logits) features.
    image_size: the resolution the position embedding is built for.
    classifier: "token" (class token), "gap" (mean of the tokens after the final
      norm) or "map" (multihead attention pooling, as in big_vision/SigLIP).
    posemb: "learn" or "sincos2d" (fixed, no parameters).
    representation_size: width of the optional tanh pre-logits layer.
    drop_path_rate: stochastic depth at the last block; rises linearly from 0.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """
  num_classes: int = 1000
  image_size: Union[int, Sequence[int]] = 224
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  classifier: str = "token"
  posemb: str = "learn"
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  head_zeroinit: bool = True
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check_config(self):
    if self.classifier not in ("token", "gap", "map"):
      raise ValueError(f"classifier must be 'token', 'gap' or 'map', got {self.classifier!r}")
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    """The token grid for an input size, or a ValueError naming the constraint."""
    expected = _pair(self.image_size)
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(
          f"ViT with patch size {p} needs image sides divisible by {p}; got "
          f"{height}x{width}. Resize the input (e.g. to {expected[0]}x{expected[1]}).")
    if (height, width) != expected and self.posemb == "learn":
      raise ValueError(
          f"this ViT's learned position embedding is built for {expected[0]}x"
          f"{expected[1]} images ({expected[0] // p}x{expected[1] // p} patches); got "
          f"{height}x{width}. Create the model with image_size=({height}, {width}) "
          "and resample the position embedding when loading weights.")
    return height // p, width // p

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    self._check_config()
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    gh, gw = self.patch_grid(images.shape[1], images.shape[2])

    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=dtype, param_dtype=param_dtype, name="embedding")(
                    images.astype(dtype))
    batch = x.shape[0]
    x = x.reshape(batch, gh * gw, self.hidden_size)
    if self.posemb == "sincos2d":
      x = x + layers.posemb_sincos_2d(gh, gw, self.hidden_size, dtype=dtype)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size),
                       param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(dtype), [batch, 1, 1]), x], axis=1)

    x = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim,
                num_heads=self.num_heads, learned_posemb=self.posemb == "learn",
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=self.drop_path_rate,
                gelu_approximate=self.gelu_approximate, dtype=dtype,
                param_dtype=param_dtype, name="Transformer")(x, train=train)

    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = layers.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                         gelu_approximate=self.gelu_approximate, dtype=dtype,
                         param_dtype=param_dtype, name="MAPHead_0")(x)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=dtype, param_dtype=param_dtype,
                   name="pre_logits")(x)
      x = jnp.tanh(x)
    self.sow("intermediates", "features", x)
    if not self.num_classes:
      return x.astype(jnp.float32)
    head_init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    x = nn.Dense(self.num_classes, kernel_init=head_init, dtype=dtype,
                 param_dtype=param_dtype, name="head")(x)
    return x.astype(jnp.float32)


def _timm_attention(state: StateDict, prefix: str, num_heads: int, *,
                    fused_qkv: bool = True) -> dict:
  """timm attention (``qkv`` or ``q``+``kv`` Linear, ``proj``) -> query/key/value/out."""
  if fused_qkv:
    w, b = state.take(f"{prefix}.qkv.weight"), state.take(f"{prefix}.qkv.bias")
    ws, bs = np.split(w, 3, axis=0), np.split(b, 3)
  else:  # attention pooling: the query comes from the probe, key/value from tokens
    wkv, bkv = state.take(f"{prefix}.kv.weight"), state.take(f"{prefix}.kv.bias")
    ws = [state.take(f"{prefix}.q.weight")] + np.split(wkv, 2, axis=0)
    bs = [state.take(f"{prefix}.q.bias")] + np.split(bkv, 2)
  dim = ws[0].shape[1]
  head_dim = ws[0].shape[0] // num_heads
  out = {name: {"kernel": w.T.reshape(dim, num_heads, head_dim),
                "bias": bias.reshape(num_heads, head_dim)}
         for name, w, bias in zip(("query", "key", "value"), ws, bs)}
  proj = state.take(f"{prefix}.proj.weight")
  out["out"] = {"kernel": proj.T.reshape(num_heads, head_dim, proj.shape[0]),
                "bias": state.take(f"{prefix}.proj.bias")}
  return out


def _timm_mlp(state: StateDict, prefix: str) -> dict:
  return {"Dense_0": state.linear(f"{prefix}.fc1"), "Dense_1": state.linear(f"{prefix}.fc2")}


@register_timm_converter("vit")
def convert_timm_vit(state: StateDict, model: VisionTransformer) -> dict:
  """timm ``VisionTransformer`` state dict -> vision_transformer-layout params.

  Matches timm models with a class token or MAP pooling (``global_pool="map"``);
  timm's average pooling applies its norm after pooling, which this layout does not.
  """
  encoder = {"encoder_norm": state.norm("norm")}
  if model.posemb == "learn":
    encoder["posembed_input"] = {"pos_embedding": state.take("pos_embed")}
  for i in range(model.num_layers):
    block = f"blocks.{i}"
    encoder[f"encoderblock_{i}"] = {
        "LayerNorm_0": state.norm(f"{block}.norm1"),
        "MultiHeadDotProductAttention_1": _timm_attention(state, f"{block}.attn",
                                                          model.num_heads),
        "LayerNorm_2": state.norm(f"{block}.norm2"),
        "MlpBlock_3": _timm_mlp(state, f"{block}.mlp"),
    }
  params = {"embedding": state.conv("patch_embed.proj"), "Transformer": encoder}
  if model.classifier == "token":
    params["cls"] = state.take("cls_token")
  if model.classifier == "map":
    params["MAPHead_0"] = {
        "probe": state.take("attn_pool.latent"),
        "MultiHeadDotProductAttention_0": _timm_attention(
            state, "attn_pool", model.num_heads, fused_qkv=False),
        "LayerNorm_0": state.norm("attn_pool.norm"),
        "MlpBlock_0": _timm_mlp(state, "attn_pool.mlp"),
    }
  if model.num_classes:
    params["head"] = state.linear("head")
  return params


def _register_variants():
  """Registers timm-style names: vit_{size}_patch{p}_{res} for every size and patch."""
  for size, dims in VARIANTS.items():
    for patch in PATCH_SIZES:
      resolutions = (224, 384) if patch in (16, 32) else (224,)
      for res in resolutions:
        name = f"vit_{size}_patch{patch}_{res}"
        defaults = dict(dims, patch_size=patch, image_size=res)

        def factory(defaults=defaults, **overrides):
          return VisionTransformer(**{**defaults, **overrides})

        factory.__doc__ = f"ViT-{size[0].upper()}/{patch} at {res}x{res}."
        register_model(name, family="vit", image_size=res)(factory)


_register_variants()
