"""The gated scan in XLA: the reference's chunked forward, a hand-written backward.

``jax.grad`` through the reference would keep every chunk's ``[C, C, dk]`` decays
and scores for the backward pass; this ``custom_vjp`` keeps only the inputs and
recomputes, chunk by chunk, with the same stable differences of cumulative log gates
(see ``reference.py``). With ``dS_c`` the cotangent of the state leaving chunk ``c``
(a scan over chunks in reverse: ``dS_{c-1} = exp(G_L) dS_c + sum_i (q_i exp(G_i))^T
do_i``) and ``dA_ij = do_i . v_j``::

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan(q, k, v, g, chunk):
  tokens = q.shape[1]
  out = ref.chunked_forward(*(ref.to_chunks(x, chunk) for x in (q, k, v, g)))
  return ref.from_chunks(out, tokens).astype(v.dtype)


def _scan_fwd(q, k, v, g, chunk):
  return _scan(q, k, v, g, chunk), (q, k, v, g)


def _scan_bwd(chunk, residuals, d_out):
  q0, k0, v0, g0 = residuals
  tokens = q0.shape[1]
  q, k, v, g, do = (ref.to_chunks(x, chunk) for x in (q0, k0, v0, g0, d_out))
  cum = jnp.cumsum(g, axis=-2)
  decay = ref.intra_decay(cum)
  last = cum[..., -1:, :]
  update, chunk_decay = ref.chunk_states(k, v, cum)
  states = ref.entering_states(update, chunk_decay)

  # Cotangent of the state leaving each chunk: a scan over chunks in reverse.
  q_decayed = q * jnp.exp(cum)
  from_outputs = jnp.einsum("...in,...ie->...ne", q_decayed, do, precision=HIGHEST)

  def step(d_state, xs):
    dec, local = xs
    return dec[..., None] * d_state + local, d_state

  xs = (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(from_outputs, 2, 0))
  _, d_leaving = jax.lax.scan(step, jnp.zeros_like(from_outputs[:, :, 0]), xs,
                              reverse=True)
  d_leaving = jnp.moveaxis(d_leaving, 0, 2)

  scores = ref.intra_scores(q, k, decay)
  d_scores = jnp.einsum("...ie,...je->...ij", do, v, precision=HIGHEST)
  k_decayed = k * jnp.exp(last - cum)
  dv = (jnp.einsum("...ij,...ie->...je", scores, do, precision=HIGHEST)
        + jnp.einsum("...jn,...ne->...je", k_decayed, d_leaving, precision=HIGHEST))
  if decay.shape[-1] == 1 and q.shape[-1] != 1:
    weighted = d_scores * decay[..., 0]
    dq_intra = jnp.einsum("...ij,...jn->...in", weighted, k, precision=HIGHEST)
    dk_intra = jnp.einsum("...ij,...in->...jn", weighted, q, precision=HIGHEST)
  else:
    dq_intra = jnp.einsum("...ij,...jn,...ijn->...in", d_scores, k, decay,
                          precision=HIGHEST)
    dk_intra = jnp.einsum("...ij,...in,...ijn->...jn", d_scores, q, decay,
                          precision=HIGHEST)
  dq = dq_intra + jnp.exp(cum) * jnp.einsum("...ie,...ne->...in", do, states,
                                             precision=HIGHEST)
  dk = dk_intra + jnp.exp(last - cum) * jnp.einsum("...je,...ne->...jn", v, d_leaving,
                                                    precision=HIGHEST)
  dq, dk, dv = (ref.from_chunks(x, tokens) for x in (dq, dk, dv))
  dg = reverse_cumsum(q0.astype(jnp.float32) * dq - k0.astype(jnp.float32) * dk)
  if g0.shape[3] == 1:
    dg = jnp.sum(dg, axis=3, keepdims=True)
  return (dq.astype(q0.dtype), dk.astype(k0.dtype), dv.astype(v0.dtype),
          dg.astype(g0.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)


def reverse_cumsum(x: Array, axis: int = 1) -> Array:
  """``y_t = sum_{s >= t} x_s`` along ``axis``."""
  return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)


def gated_scan(q: Array, k: Array, v: Array, g: Array, *, reverse: bool = False,
               chunk: int | None = None) -> Array:
  """``reference.gated_scan_reference`` with the memory-lean backward above."""
  ref.check_inputs(q, k, v, g)
  chunk = chunk or ref.default_chunk(q, v, g)
  if reverse:
    flip = lambda x: jnp.flip(x, axis=1)
    return flip(_scan(flip(q), flip(k), flip(v), flip(g), chunk))
  return _scan(q, k, v, g, chunk)
