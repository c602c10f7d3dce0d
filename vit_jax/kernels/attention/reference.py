"""Global softmax attention: the specification every fused path must match.

vision_transformer semantics: logits ``query . key * head_dim**-0.5``, an additive
``bias``, a boolean ``mask`` (True where attention is allowed), softmax in float32
whatever the compute dtype (cheap, and it avoids overflow in bfloat16), weights cast
back to the value dtype. ``segment_ids`` (sequence packing, NaViT) restrict each token
to the tokens of its own segment: a block-diagonal mask. ``dropout_fn`` (training only) acts on the weights; the fused
kernels have no weights to drop, so models fall back to this function when dropping.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_reference(query: Array, key: Array, value: Array, *,
                        bias: Optional[Array] = None, mask: Optional[Array] = None,
                        dropout_fn: Optional[Callable[[Array], Array]] = None,
                        segment_ids: Optional[Array] = None,
                        softmax_fn: Optional[Callable[..., Array]] = None) -> Array:
  """Softmax attention over ``[batch, tokens, heads, head_dim]``.

  Args:
    query: ``[batch, q_len, heads, head_dim]``.
    key, value: ``[batch, kv_len, heads, head_dim]``.
    bias: added to the logits, broadcastable to ``[batch, heads, q_len, kv_len]``.
    mask: boolean, True where attention is allowed, same broadcasting as ``bias``.
    dropout_fn: applied to the attention weights (training only).
    segment_ids: integer ``[batch, tokens]`` (self-attention: ``q_len == kv_len``);
      query ``i`` attends to key ``j`` only where ``segment_ids`` agree (combined
      with ``mask``). Padding is a segment of its own: it never reaches real tokens.
    softmax_fn: ``f(logits, axis=-1)`` in place of ``jax.nn.softmax`` (the
      outlier-robust and integer softmaxes of ``vit_jax.models.robust_ops``); masked
      logits reach it as the float32 minimum.
  """
  if segment_ids is not None:
    segment_mask = segment_attention_mask(segment_ids, query.shape[1], key.shape[1])
    mask = segment_mask if mask is None else jnp.logical_and(mask, segment_mask)
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  softmax_fn = softmax_fn or jax.nn.softmax
  weights = softmax_fn(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  if dropout_fn is not None:
    weights = dropout_fn(weights)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def segment_attention_mask(segment_ids: Array, q_len: int, kv_len: int) -> Array:
  """``[batch, 1, tokens, tokens]`` booleans: True where two tokens share a segment."""
  check_segment_ids(segment_ids, q_len, kv_len)
  return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def check_segment_ids(segment_ids: Array, q_len: int, kv_len: int) -> None:
  """Raises unless ``segment_ids`` are integers ``[batch, tokens]`` for self-attention."""
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.ndim != 2 or not (segment_ids.shape[1] == q_len == kv_len):
    raise ValueError("segment_ids must be [batch, tokens] for self-attention over "
                     f"{q_len} queries and {kv_len} keys; got {segment_ids.shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
