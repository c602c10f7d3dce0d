"""The gated scan in XLA: the reference's chunked form, one chunk per scan step, with
a hand-written backward.

The reference computes every chunk's ``[C, C, dk]`` decays at once, and ``jax.grad``
through it would keep them all for the backward pass; here a ``lax.scan`` walks the
chunks (so one chunk's decays exist at a time) and the ``custom_vjp`` keeps only the
inputs, recomputing chunk by chunk with the same stable differences of cumulative log
gates (see ``reference.py``). The backward is two scans, as the Pallas kernels: dq
walking the chunks forward with the state ``S_c`` entering each, then dk, dv walking
them in reverse with ``dS_c``, the cotangent of the state leaving chunk ``c``
(``dS_{c-1} = exp(G_L) dS_c + sum_i (q_i exp(G_i))^T do_i``). With
``dA_ij = do_i . v_j``::

  dv_j = sum_{i>=j} A_ij do_i + (k_j exp(G_L - G_j)) dS_c
  dq_i = sum_{j<=i} dA_ij k_j exp(G_i - G_j) + exp(G_i) (S_c do_i^T)
  dk_j = sum_{i>=j} dA_ij q_i exp(G_i - G_j) + exp(G_L - G_j) (dS_c v_j^T)
  dg_t = sum_{s>=t} (q_s dq_s - k_s dk_s)      (over the whole sequence)

The last line holds for any gated recurrence of this form: ``G_t`` enters every term
as ``+G_i`` on the query side and ``-G_j`` on the key side. A per-head decay sums it
over the key dimension. This is the path on CPU and GPU (there is no Mosaic GPU
kernel yet; see ``vit_jax/kernels/gated_scan/__init__.py``).
"""

import functools

import jax
import jax.numpy as jnp

from vit_jax.kernels.gated_scan import reference as ref

Array = jax.Array
HIGHEST = ref.HIGHEST


def _by_chunk(x: Array, chunk: int) -> Array:
  """``[B, T, H, d]`` -> float32 ``[n, B, H, C, d]``: chunks first, for ``lax.scan``."""
  return jnp.moveaxis(ref.to_chunks(x, chunk), 2, 0)


def _unchunk(x: Array, tokens: int) -> Array:
  return ref.from_chunks(jnp.moveaxis(x, 0, 2), tokens)


def _zeros_state(k: Array, v: Array) -> Array:
  return jnp.zeros(k.shape[1:3] + (k.shape[-1], v.shape[-1]), jnp.float32)


def _flip(x: Array, reverse: bool) -> Array:
  return jnp.flip(x, axis=1) if reverse else x


# ``reverse`` flips inside the custom VJP, so that the residuals are the caller's
# arrays (shared by the two directions of a bidirectional layer), not flipped copies.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _scan(q, k, v, g, chunk, reverse):
  tokens = q.shape[1]
  q, k, v, g = (_by_chunk(_flip(x, reverse), chunk) for x in (q, k, v, g))

  # One chunk per step: only one chunk's [C, C, dk] decays exist at a time.
  def step(state, xs):
    qc, kc, vc, gc = xs
    cum = jnp.cumsum(gc, axis=-2)
    scores = ref.intra_scores(qc, kc, ref.intra_decay(cum))
    out = (jnp.einsum("...ij,...je->...ie", scores, vc, precision=HIGHEST)
           + jnp.einsum("...in,...ne->...ie", qc * jnp.exp(cum), state, precision=HIGHEST))
    update, decay = ref.chunk_states(kc, vc, cum)
    return decay[..., None] * state + update, out

  _, out = jax.lax.scan(step, _zeros_state(k, v), (q, k, v, g))
  return _flip(_unchunk(out, tokens), reverse).astype(v.dtype)


def _scan_fwd(q, k, v, g, chunk, reverse):
  return _scan(q, k, v, g, chunk, reverse), (q, k, v, g)


def _scan_bwd(chunk, reverse, residuals, d_out):
  q0, k0, v0, g0 = (_flip(x, reverse) for x in residuals)
  tokens = q0.shape[1]
  q, k, v, g, do = (_by_chunk(x, chunk) for x in (q0, k0, v0, g0, _flip(d_out, reverse)))
  per_head = g.shape[-1] == 1 and q.shape[-1] != 1

  def weighted_scores(d_scores, decay):
    return d_scores * decay[..., 0] if per_head else d_scores

  # dq: chunks first to last, carrying the state S as the forward pass does (nothing
  # per chunk is stored between the passes, as in the Pallas kernels).
  def query_step(state, xs):
    qc, kc, vc, gc, doc = xs
    cum = jnp.cumsum(gc, axis=-2)
    decay = ref.intra_decay(cum)
    d_scores = jnp.einsum("...ie,...je->...ij", doc, vc, precision=HIGHEST)
    if per_head:
      dq = jnp.einsum("...ij,...jn->...in", weighted_scores(d_scores, decay), kc,
                      precision=HIGHEST)
    else:
      dq = jnp.einsum("...ij,...jn,...ijn->...in", d_scores, kc, decay, precision=HIGHEST)
    dq += jnp.exp(cum) * jnp.einsum("...ie,...ne->...in", doc, state, precision=HIGHEST)
    update, chunk_decay = ref.chunk_states(kc, vc, cum)
    return chunk_decay[..., None] * state + update, dq

  _, dq = jax.lax.scan(query_step, _zeros_state(k, v), (q, k, v, g, do))

  # dk, dv: chunks last to first, carrying the cotangent of the state leaving the chunk.
  def key_value_step(d_state, xs):
    qc, kc, vc, gc, doc = xs
    cum = jnp.cumsum(gc, axis=-2)
    decay = ref.intra_decay(cum)
    to_end = jnp.exp(cum[..., -1:, :] - cum)
    scores = ref.intra_scores(qc, kc, decay)
    d_scores = jnp.einsum("...ie,...je->...ij", doc, vc, precision=HIGHEST)
    dv = (jnp.einsum("...ij,...ie->...je", scores, doc, precision=HIGHEST)
          + jnp.einsum("...jn,...ne->...je", kc * to_end, d_state, precision=HIGHEST))
    if per_head:
      dk = jnp.einsum("...ij,...in->...jn", weighted_scores(d_scores, decay), qc,
                      precision=HIGHEST)
    else:
      dk = jnp.einsum("...ij,...in,...ijn->...jn", d_scores, qc, decay, precision=HIGHEST)
    dk += to_end * jnp.einsum("...je,...ne->...jn", vc, d_state, precision=HIGHEST)
    d_state = (jnp.exp(cum[..., -1, :])[..., None] * d_state
               + jnp.einsum("...in,...ie->...ne", qc * jnp.exp(cum), doc,
                            precision=HIGHEST))
    return d_state, (dk, dv)

  _, (dk, dv) = jax.lax.scan(key_value_step, _zeros_state(k, v), (q, k, v, g, do),
                             reverse=True)
  dq, dk, dv = (_unchunk(x, tokens) for x in (dq, dk, dv))
  dg = reverse_cumsum(q0.astype(jnp.float32) * dq - k0.astype(jnp.float32) * dk)
  if g0.shape[3] == 1:
    dg = jnp.sum(dg, axis=3, keepdims=True)
  return tuple(_flip(d.astype(x.dtype), reverse)
               for d, x in zip((dq, dk, dv, dg), (q0, k0, v0, g0)))


_scan.defvjp(_scan_fwd, _scan_bwd)


def reverse_cumsum(x: Array, axis: int = 1) -> Array:
  """``y_t = sum_{s >= t} x_s`` along ``axis``."""
  return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


def gated_scan(q: Array, k: Array, v: Array, g: Array, *, reverse: bool = False,
               chunk: int | None = None) -> Array:
  """``reference.gated_scan_reference`` with the memory-lean backward above."""
  ref.check_inputs(q, k, v, g)
  return _scan(q, k, v, g, chunk or ref.default_chunk(q, v, g), bool(reverse))
