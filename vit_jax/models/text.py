"""Text transformer: the text tower of CLIP/SigLIP-style two-tower models.

Token embedding + learned position embedding, pre-norm transformer blocks (the ViT's
``Encoder``, here with a causal or padding mask), a final LayerNorm and a pooling:

  "eot"     features at the end-of-text token (CLIP): the first ``eot_id`` in the
            sequence, or the last non-padding token when ``eot_id`` is None
  "argmax"  features at the position of the largest token id (OpenAI CLIP's rule: its
            end-of-text token has the largest id; open_clip's default)
  "last", "first"   a fixed position
  "mean"    average over the non-padding tokens
  "map"     multihead attention pooling over the non-padding tokens (as SigLIP's image
            tower)

``causal=True`` (CLIP) lets each token see only the tokens before it, so padding after
the end-of-text token never reaches the pooled features; with ``causal=False`` the
attention ignores padding tokens (``pad_id``) instead. Numerically this matches
open_clip's ``TextTransformer`` (converted by ``two_tower.from_open_clip``).

Parameter tree::

  token_embedding/embedding                  [vocab_size, hidden_size]
  Transformer/posembed_input/pos_embedding   [1, context_length, hidden_size]
  Transformer/encoderblock_{i}/...           as in the ViT
  Transformer/encoder_norm
  MAPHead_0/...                              (pool="map")
  head/{kernel,bias}                         (num_classes > 0)
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.models import layers
from vit_jax.models.vit import Encoder

Array = Any
POOLS = ("eot", "argmax", "last", "first", "mean", "map")


class TextTransformer(nn.Module):
  """Call with int token ids ``[batch, context_length]``; returns float32 features.

  Attributes:
    num_classes: width of the output projection ``head``; 0 returns the pooled
      features (the convention of the image models).
    head_bias: whether ``head`` has a bias (open_clip's projection has none).
  """
  num_classes: int = 0
  vocab_size: int = 49408
  context_length: int = 77
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  causal: bool = True
  pool: str = "eot"
  eot_id: Optional[int] = None
  pad_id: int = 0
  head_bias: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  gelu_approximate: bool = False
  norm_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check(self, tokens: Array) -> None:
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
    if tokens.ndim != 2:
      raise ValueError(f"expected token ids [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] != self.context_length:
      raise ValueError(
          f"this text tower takes sequences of context_length={self.context_length} "
          f"tokens (its learned position embedding); got {tokens.shape[1]}. Tokenize "
          "with the same context_length (Tokenizer(context_length=...)).")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got {tokens.dtype}")

  @nn.compact
  def __call__(self, tokens: Array, *, train: bool = False) -> Array:
    self._check(tokens)
    dtype = layers.canonical_dtype(self.dtype)
    param_dtype = layers.canonical_dtype(self.param_dtype)
    length = self.context_length
    valid = tokens != self.pad_id  # [batch, length]

    x = nn.Embed(self.vocab_size, self.hidden_size, dtype=dtype, param_dtype=param_dtype,
                 embedding_init=nn.initializers.normal(stddev=0.02),
                 name="token_embedding")(tokens)
    if self.causal:
      mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    else:
      mask = valid[:, None, None, :]
    x = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim,
                num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                drop_path_rate=self.drop_path_rate,
                gelu_approximate=self.gelu_approximate, norm_epsilon=self.norm_epsilon,
                dtype=dtype, param_dtype=param_dtype,
                name="Transformer")(x, mask=mask, train=train)

    # One position per sequence. take_along_axis keeps the batch a batch dimension of
    # the gather, so a batch-sharded input needs no communication (x[arange, index]
    # made XLA gather across data-parallel devices).
    at = lambda index: jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    if self.pool == "eot":
      if self.eot_id is not None:
        x = at(jnp.argmax(tokens == self.eot_id, axis=1))
      else:
        x = at(jnp.maximum(jnp.sum(valid, axis=1) - 1, 0))
    elif self.pool == "argmax":
      x = at(jnp.argmax(tokens, axis=1))
    elif self.pool == "last":
      x = x[:, -1]
    elif self.pool == "first":
      x = x[:, 0]
    elif self.pool == "mean":
      weights = valid.astype(x.dtype)[..., None]
      x = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    else:
      x = layers.MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                         gelu_approximate=self.gelu_approximate, dtype=dtype,
                         param_dtype=param_dtype, name="MAPHead_0")(x, mask=valid)
    return layers.classifier_head(self, x, self.num_classes, use_bias=self.head_bias,
                                  dtype=dtype, param_dtype=param_dtype)
