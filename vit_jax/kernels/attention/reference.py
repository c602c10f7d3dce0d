"""Global softmax attention: the specification every fused path must match.

vision_transformer semantics: logits ``query . key * head_dim**-0.5``, an additive
``bias``, a boolean ``mask`` (True where attention is allowed), softmax in float32
whatever the compute dtype (cheap, and it avoids overflow in bfloat16), weights cast
back to the value dtype. ``dropout_fn`` (training only) acts on the weights; the fused
kernels have no weights to drop, so models fall back to this function when dropping.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def attention_reference(query: Array, key: Array, value: Array, *,
                        bias: Optional[Array] = None, mask: Optional[Array] = None,
                        dropout_fn: Optional[Callable[[Array], Array]] = None) -> Array:
  """Softmax attention over ``[batch, tokens, heads, head_dim]``.

  Args:
    query: ``[batch, q_len, heads, head_dim]``.
    key, value: ``[batch, kv_len, heads, head_dim]``.
    bias: added to the logits, broadcastable to ``[batch, heads, q_len, kv_len]``.
    mask: boolean, True where attention is allowed, same broadcasting as ``bias``.
    dropout_fn: applied to the attention weights (training only).
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  if dropout_fn is not None:
    weights = dropout_fn(weights)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
