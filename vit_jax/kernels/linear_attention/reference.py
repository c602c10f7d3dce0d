"""Non-causal linear attention: the specification.

Per head, with a feature map ``phi`` applied to queries and keys::

  out_i = phi(q_i)^T S / (phi(q_i)^T z + eps),   S = sum_j phi(k_j) v_j^T,
                                                   z = sum_j phi(k_j)

(``normalize=False`` drops the denominator). Cost is linear in the number of tokens:
``S`` is ``[head_dim, head_dim]`` whatever the length. EfficientViT's LiteMLA is this
with ``phi = relu`` and ``eps = 1e-5`` (timm ``efficientvit_mit``); Katharopoulos et al.
(2020) use ``phi = elu + 1``. As in LiteMLA, the arithmetic runs in float32 and the
result is cast back to the dtype of ``value``.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

FEATURE_MAPS = ("relu", "elu+1", "identity")


def feature_map(x: Array, name: str) -> Array:
  if name == "relu":
    return jax.nn.relu(x)
  if name == "elu+1":
    return jax.nn.elu(x) + 1.0
  if name == "identity":
    return x
  raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def feature_map_and_grad(x: Array, name: str) -> tuple[Array, Array]:
  """``(phi(x), phi'(x))`` elementwise, for kernels with a hand-written backward pass.

  Written with ``where``/``maximum`` only, so that Pallas kernel bodies can use it.
  """
  if name == "relu":
    return jnp.maximum(x, 0.0), (x > 0).astype(x.dtype)
  if name == "elu+1":
    e = jnp.exp(jnp.minimum(x, 0.0))
    return jnp.where(x > 0, x + 1.0, e), jnp.where(x > 0, 1.0, e)
  return x, jnp.ones_like(x)


def check_inputs(query: Array, key: Array, value: Array, feature_map_name: str) -> None:
  if feature_map_name not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map_name!r}")
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError("linear attention takes [batch, tokens, heads, head_dim] arrays; got "
                     f"{query.shape}, {key.shape}, {value.shape}")
  if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2] or (
      query.shape[3] != key.shape[3]):
    raise ValueError(f"query {query.shape} and key {key.shape} must agree in batch, "
                     "heads and head_dim")
  if key.shape[:3] != value.shape[:3]:
    raise ValueError(f"key {key.shape} and value {value.shape} must agree in batch, "
                     "tokens and heads")


def linear_attention_reference(query: Array, key: Array, value: Array, *,
                               feature_map: str = "relu", normalize: bool = True,
                               eps: float = 1e-5) -> Array:
  """Linear attention over ``[batch, tokens, heads, head_dim]`` arrays.

  ``query`` may have a different number of tokens than ``key``/``value``; ``value``
  may have a different head dim than ``query``/``key``.
  """
  check_inputs(query, key, value, feature_map)
  phi_q = _phi(query, feature_map)
  phi_k = _phi(key, feature_map)
  v = value.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  state = jnp.einsum("bnhd,bnhe->bhde", phi_k, v, precision=hp)
  out = jnp.einsum("bnhd,bhde->bnhe", phi_q, state, precision=hp)
  if normalize:
    z = jnp.sum(phi_k, axis=1)  # [b, h, d]
    den = jnp.einsum("bnhd,bhd->bnh", phi_q, z, precision=hp)
    out = out / (den[..., None] + eps)
  return out.astype(value.dtype)


def _phi(x, name):
  return feature_map(x.astype(jnp.float32), name)
