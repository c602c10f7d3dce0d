"""T2T-ViT (Yuan et al., 2021): a Tokens-to-Token tokenizer in front of a deep-narrow ViT.

The tokenizer "soft-splits" the image into overlapping 7x7 patches (stride 4), lets a
small one-head transformer (Performer in ``t2t_vit_{14,19,24}``, softmax attention in
``t2t_vit_t_*``) restructure those tokens, folds them back into a map and soft-splits
again (3x3, stride 2) twice, which leaves 1/16 of the side; a linear layer projects to
the backbone width. The backbone is a plain class-token ViT with a fixed 1-D
sinusoid position table and no query/key/value biases. Not in timm: this follows the
official code (yitu-opensource/T2T-ViT, ``models/t2t_vit.py``, ``token_performer.py``,
``token_transformer.py``), including its quirks:

- a T2T layer's residual goes around attention through the values (the token width
  changes from ``C*k*k`` to ``token_dim``), and its MLP keeps the width;
- the softmax T2T attention scales by the *input* width ``(C*k*k) ** -0.5``;
- the Performer's random features are a fixed orthogonal matrix drawn at init (frozen
  in the official code); here it lives in the non-trainable ``constants`` collection,
  not in ``params``;
- the T2T layers have their own dropout of 0.1 (``t2t_dropout_rate``).

The official *pretrained* weights were trained with ``qk_scale = embed_dim ** -0.5`` in
the backbone; this model uses the standard ``head_dim ** -0.5`` (no converter exists).

Parameter tree::

  tokens_to_token/attention1, attention2   T2T layers (norm1, kqv|qkv, proj, norm2, mlp)
  tokens_to_token/project                  Dense to the backbone width
  cls, encoderblock_{i} (vit.Encoder1DBlock), norm, head

Intermediates: ``block_{i}`` (backbone tokens, class token first), ``features``.
Any input size works (the position table is computed for the actual token count).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, vit
from vit_jax.models.registry import register_variant

Array = Any
LN_EPS = 1e-5  # PyTorch's default, used throughout the official code
# (kernel, stride, padding) of the three soft splits.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def soft_split(x: Array, kernel: int, stride: int, padding: int) -> Array:
  """Overlapping patches, as ``torch.nn.Unfold``: ``[B, H, W, C] -> [B, H', W', C*k*k]``.

  The output features are ordered channel-major then kernel row then kernel column, as
  Unfold's, so weights of the official layout apply unchanged. Built from strided
  slices (exact on every backend; no identity convolution).
  """
  batch, height, width, channels = x.shape
  out_h = (height + 2 * padding - kernel) // stride + 1
  out_w = (width + 2 * padding - kernel) // stride + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f"a {kernel}x{kernel} soft split (padding {padding}) needs a map of "
                     f"at least {kernel - 2 * padding} pixels a side; got {height}x{width}")
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(kernel) for j in range(kernel)]
  patches = jnp.stack(taps, axis=-1)  # [B, H', W', C, k*k]
  return patches.reshape(batch, out_h, out_w, channels * kernel * kernel)


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
  """The official 1-D table: sin on even channels, cos on odd, ``[1, n, dim]``."""
  positions = np.arange(num_positions)[:, None]
  rates = np.power(10000, 2 * (np.arange(dim) // 2) / dim)
  angles = positions / rates
  angles[:, 0::2] = np.sin(angles[:, 0::2])
  angles[:, 1::2] = np.cos(angles[:, 1::2])
  return angles[None].astype(np.float32)


class T2TMlp(nn.Module):
  """Dense -> GELU -> Dense (same width) -> dropout, as the official T2T layers."""
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    dim = x.shape[-1]
    y = layers.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_0")(x)
    y = layers.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="Dense_1")(layers.gelu(y))
    return nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)


class TokenPerformer(nn.Module):
  """One-head Performer T2T layer: FAVOR+ positive random features, value residual."""
  features: int
  kernel_ratio: float = 0.5
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb, m = self.features, int(self.features * self.kernel_ratio)
    omega = self.variable(
        "constants", "random_features",
        lambda: jax.nn.initializers.orthogonal(scale=math.sqrt(m))(
            self.make_rng("params"), (m, emb), jnp.float32)).value

    x = layers.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
    k, q, v = jnp.split(layers.Dense(3 * emb, name="kqv", **kw)(x), 3, axis=-1)

    def features(t):  # exp(w.t - |t|^2 / 2) / sqrt(m), in float32 as the official code
      t = t.astype(jnp.float32)
      wt = jnp.einsum("bti,mi->btm", t, omega)
      return jnp.exp(wt - jnp.sum(t * t, -1, keepdims=True) / 2) / math.sqrt(m)

    kp, qp = features(k), features(q)
    normaliser = jnp.einsum("btm,bm->bt", qp, kp.sum(axis=1))[..., None]
    kv = jnp.einsum("bin,bim->bnm", v.astype(jnp.float32), kp)
    y = (jnp.einsum("btm,bnm->btn", qp, kv) / (normaliser + 1e-8)).astype(self.dtype)
    y = layers.Dense(emb, name="proj", **kw)(y)
    y = v + nn.Dropout(rate=self.dropout_rate)(y, deterministic=not train)
    z = layers.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(y)
    return y + T2TMlp(self.dropout_rate, name="mlp", **kw)(z, train=train)


class TokenTransformer(nn.Module):
  """One-head softmax T2T layer (``t2t_vit_t_*``), value residual."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_dim = x.shape[-1]
    x = layers.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
    q, k, v = jnp.split(layers.Dense(3 * self.features, use_bias=False, name="qkv", **kw)(x),
                        3, axis=-1)
    # The official scale uses the input width, not the (single) head's width.
    logits = jnp.einsum("bqd,bkd->bqk", q * in_dim ** -0.5, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = layers.Dense(self.features, name="proj", **kw)(jnp.einsum("bqk,bkd->bqd", weights, v))
    y = v + y
    z = layers.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(y)
    return y + T2TMlp(0.0, name="mlp", **kw)(z, train=train)


class TokensToToken(nn.Module):
  """Soft split -> T2T layer -> fold, twice; a last soft split; project to the width."""
  hidden_size: int
  token_dim: int = 64
  tokens_type: str = "performer"
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images
    for i, (kernel, stride, padding) in enumerate(SOFT_SPLITS):
      x = soft_split(x, kernel, stride, padding)
      batch, height, width, dim = x.shape
      tokens = x.reshape(batch, height * width, dim)
      if i == len(SOFT_SPLITS) - 1:
        break
      if self.tokens_type == "performer":
        layer = TokenPerformer(self.token_dim, dropout_rate=self.dropout_rate,
                               name=f"attention{i + 1}", **kw)
      else:
        layer = TokenTransformer(self.token_dim, name=f"attention{i + 1}", **kw)
      x = layer(tokens, train=train).reshape(batch, height, width, self.token_dim)
    return layers.Dense(self.hidden_size, name="project", **kw)(tokens)


class T2TViT(nn.Module):
  """T2T-ViT classifier. Call with NHWC images; returns float32 logits (or features).

  Attributes:
    tokens_type: "performer" (t2t_vit_N) or "transformer" (t2t_vit_t_N) T2T layers.
    token_dim: width of the T2T layers' tokens.
    image_size: the default resolution (any size works; the token grid is side/16).
    num_classes: 0 returns the normalised class token.
  """
  num_classes: int = 1000
  image_size: int = 224
  tokens_type: str = "performer"
  token_dim: int = 64
  hidden_size: int = 384
  num_layers: int = 14
  num_heads: int = 6
  mlp_ratio: float = 3.0
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  t2t_dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    if self.tokens_type not in ("performer", "transformer"):
      raise ValueError(f"tokens_type must be 'performer' or 'transformer', got "
                       f"{self.tokens_type!r}")
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    layers.check_images(images)
    x = TokensToToken(self.hidden_size, self.token_dim, self.tokens_type,
                      self.t2t_dropout_rate, dtype=dtype, param_dtype=param_dtype,
                      name="tokens_to_token")(images.astype(dtype), train=train)
    batch = x.shape[0]
    cls = self.param("cls", nn.initializers.normal(stddev=0.02), (1, 1, self.hidden_size),
                     param_dtype)
    x = jnp.concatenate([jnp.tile(cls.astype(dtype), [batch, 1, 1]), x], axis=1)
    x = x + jnp.asarray(sinusoid_table(x.shape[1], self.hidden_size), dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    for i, rate in enumerate(layers.stochastic_depth_rates(self.drop_path_rate,
                                                           self.num_layers)):
      x = vit.Encoder1DBlock(
          mlp_dim=int(self.hidden_size * self.mlp_ratio), num_heads=self.num_heads,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, drop_path_rate=rate,
          norm_epsilon=LN_EPS, qkv_bias=self.qkv_bias, dtype=dtype,
          param_dtype=param_dtype, name=f"encoderblock_{i}")(x, train=train)
      self.sow("intermediates", f"block_{i}", x)

    x = layers.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                     name="norm")(x)[:, 0]
    return layers.classifier_head(self, x, self.num_classes, dtype=dtype,
                                  param_dtype=param_dtype)


# The official configurations (t2t_vit.py): width, depth, heads; MLP ratio 3.
VARIANTS = {
    "14": dict(hidden_size=384, num_layers=14, num_heads=6),
    "19": dict(hidden_size=448, num_layers=19, num_heads=7),
    "24": dict(hidden_size=512, num_layers=24, num_heads=8),
}


def _register_variants():
  for depth, dims in VARIANTS.items():
    for tokens_type, infix in (("performer", ""), ("transformer", "t_")):
      name = f"t2t_vit_{infix}{depth}"
      defaults = dict(dims, tokens_type=tokens_type)
      register_variant(name, T2TViT, defaults, family="t2t_vit", image_size=224,
                       doc=f"T2T-ViT-{depth} with {tokens_type} T2T layers, at 224x224.")


_register_variants()
