"""Gated linear recurrences (GLA, retention, selective state spaces): the specification.

Per batch element and head, with a state ``h`` of shape ``[dk, dv]``::

  forward:  h_t = diag(exp(g_t)) h_{t-1} + k_t^T v_t,    o_t = q_t h_t
  reverse:  h_t = diag(exp(g_t)) h_{t+1} + k_t^T v_t,    o_t = q_t h_t

(``h`` starts at zero; ``q_t, k_t`` are ``[dk]`` rows, ``v_t`` a ``[dv]`` row).
``g_t <= 0`` is a log decay: one per key dimension (``g`` of shape ``[B, T, H, dk]``:
gated linear attention, Mamba's ``Δ·A``), or one per head and token (``[B, T, H, 1]``:
retention, whose decay is the constant ``log γ``). Arrays are
``[batch, tokens, heads, dim]`` like the other kernels; the arithmetic runs in
float32 and the output has the dtype of ``v``.

``gated_scan_reference`` computes it in the chunked form: the tokens are cut into
chunks of ``chunk`` tokens; inside a chunk the outputs are matmuls against a masked
decay matrix, and a scan across chunks carries the ``[dk, dv]`` state. With
``G`` the inclusive cumulative sum of ``g`` inside the chunk, ``S`` the state entering
it and ``L`` its last position::

  o_i = sum_{j<=i} (q_i . (k_j * exp(G_i - G_j))) v_j  +  (q_i * exp(G_i)) S
  S'  = exp(G_L) * S  +  sum_j (k_j * exp(G_L - G_j))^T v_j

Every exponent is a difference ``G_i - G_j`` with ``i >= j`` (or ``G_i`` itself): never
positive, so nothing overflows however strong the decay (the naive factorisation
``exp(G_i) exp(-G_j)`` overflows once a chunk decays by more than ~88 nats). With a
per-key-dimension decay the intra-chunk term needs the ``[C, C, dk]`` decays, which
is why the default chunk is small; a per-head decay needs only ``[C, C]``.
``gated_scan_naive`` is the recurrence token by token (tests check they agree).
The reverse direction is the forward recurrence on the token-reversed sequence.
"""

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array
f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def default_chunk(q: Array, v: Array, g: Array) -> int:
  """Tokens per chunk: the [C, C, dk] intra-chunk decays of a per-key-dim gate cost
  ``C * dk`` per token and head against ``dk * dv`` for the state, so the chunk is
  small, smallest for Mamba's ``dv = 1`` (4 ran 2.6x faster than 16 there on CPU); a
  per-head decay costs ``C``."""
  if decay_kind(g, q) == "head":
    return 64
  return 16 if v.shape[3] > 4 else 4


def check_inputs(q: Array, k: Array, v: Array, g: Array) -> None:
  if not all(x.ndim == 4 for x in (q, k, v, g)):
    raise ValueError("the gated scan takes [batch, tokens, heads, dim] arrays; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}, g {g.shape}")
  if q.shape != k.shape:
    raise ValueError(f"q {q.shape} and k {k.shape} must have the same shape")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v {v.shape} must agree with q {q.shape} in batch, tokens and heads")
  if g.shape[:3] != q.shape[:3] or g.shape[3] not in (1, q.shape[3]):
    raise ValueError(f"the log decay g must be [batch, tokens, heads, dk] (per key "
                     f"dimension) or [..., 1] (per head), got {g.shape} for q {q.shape}")


def decay_kind(g: Array, q: Array) -> str:
  """``"head"`` for one decay per head (``g[..., 1]``), else ``"key"``."""
  return "head" if g.shape[3] == 1 and q.shape[3] != 1 else "key"


def to_chunks(x: Array, chunk: int) -> Array:
  """``[B, T, H, d]`` -> zero-padded float32 ``[B, H, T / chunk, chunk, d]``."""
  b, t, h, d = x.shape
  n = -(-t // chunk)
  x = jnp.pad(x.astype(f32), ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
  return x.reshape(b, n, chunk, h, d).transpose(0, 3, 1, 2, 4)


def from_chunks(x: Array, tokens: int) -> Array:
  b, h, n, c, d = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(b, n * c, h, d)[:, :tokens]


def intra_decay(cum: Array) -> Array:
  """``exp(G_i - G_j)`` for ``j <= i``, else 0: ``[..., C, d] -> [..., C, C, d]``."""
  c = cum.shape[-2]
  diff = cum[..., :, None, :] - cum[..., None, :, :]
  causal = jnp.tril(jnp.ones((c, c), bool))[:, :, None]
  return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def intra_scores(q: Array, k: Array, decay: Array) -> Array:
  """``A_ij = q_i . (k_j * exp(G_i - G_j))`` (masked to ``j <= i``): ``[..., C, C]``."""
  if decay.shape[-1] == 1 and q.shape[-1] != 1:
    return jnp.einsum("...in,...jn->...ij", q, k, precision=HIGHEST) * decay[..., 0]
  return jnp.einsum("...in,...jn,...ijn->...ij", q, k, decay, precision=HIGHEST)


def chunk_states(k: Array, v: Array, cum: Array) -> tuple[Array, Array]:
  """What each chunk adds to the state, ``[..., dk, dv]``, and its decay ``[..., dk]``."""
  last = cum[..., -1:, :]
  update = jnp.einsum("...jn,...je->...ne", k * jnp.exp(last - cum), v, precision=HIGHEST)
  return update, jnp.exp(last[..., 0, :])


def entering_states(update: Array, decay: Array) -> Array:
  """The state entering each chunk: ``S_0 = 0``, ``S_{c+1} = decay_c S_c + update_c``.

  ``update`` is ``[B, H, n, dk, dv]``, ``decay`` ``[B, H, n, dk or 1]``; a scan over
  the ``n`` chunks.
  """
  def step(state, xs):
    dec, upd = xs
    return dec[..., None] * state + upd, state

  xs = (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(update, 2, 0))
  init = jnp.zeros(update.shape[:2] + update.shape[3:], f32)
  _, states = jax.lax.scan(step, init, xs)
  return jnp.moveaxis(states, 0, 2)


def chunked_forward(q: Array, k: Array, v: Array, g: Array) -> Array:
  """The chunked form on ``[B, H, n, C, d]`` float32 chunks (forward direction)."""
  cum = jnp.cumsum(g, axis=-2)
  scores = intra_scores(q, k, intra_decay(cum))
  intra = jnp.einsum("...ij,...je->...ie", scores, v, precision=HIGHEST)
  update, decay = chunk_states(k, v, cum)
  states = entering_states(update, decay)
  inter = jnp.einsum("...in,...ne->...ie", q * jnp.exp(cum), states, precision=HIGHEST)
  return intra + inter


def _flip(xs, reverse: bool):
  return tuple(jnp.flip(x, axis=1) for x in xs) if reverse else tuple(xs)


def gated_scan_reference(q: Array, k: Array, v: Array, g: Array, *,
                         reverse: bool = False, chunk: Optional[int] = None) -> Array:
  """The gated linear recurrence over ``[batch, tokens, heads, dim]``, chunked.

  Args:
    q, k: ``[B, T, H, dk]``; v: ``[B, T, H, dv]``; any number of tokens.
    g: log decays ``<= 0``, ``[B, T, H, dk]`` or ``[B, T, H, 1]`` (one per head).
    reverse: run the recurrence from the last token to the first.
    chunk: tokens per chunk (default ``default_chunk``); the result does not depend
      on it beyond float rounding.
  """
  check_inputs(q, k, v, g)
  chunk = chunk or default_chunk(q, v, g)
  tokens = q.shape[1]
  q, k, v, g = _flip((q, k, v, g), reverse)
  out = chunked_forward(*(to_chunks(x, chunk) for x in (q, k, v, g)))
  (out,) = _flip((from_chunks(out, tokens),), reverse)
  return out.astype(v.dtype)


def gated_scan_naive(q: Array, k: Array, v: Array, g: Array, *,
                     reverse: bool = False) -> Array:
  """The recurrence as written, one token at a time (slow; for tests)."""
  check_inputs(q, k, v, g)
  xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, g))

  def step(h, x):
    qt, kt, vt, gt = x
    h = jnp.exp(gt)[..., None] * h + kt[..., :, None] * vt[..., None, :]
    return h, jnp.einsum("bhn,bhne->bhe", qt, h, precision=HIGHEST)

  b, _, heads, dk = q.shape
  init = jnp.zeros((b, heads, dk, v.shape[3]), f32)
  _, out = jax.lax.scan(step, init, xs, reverse=reverse)
  return jnp.moveaxis(out, 0, 1).astype(v.dtype)
