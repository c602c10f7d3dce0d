"""The gated scan in Pallas for TPU (Mosaic): three kernels behind a ``custom_vjp``.

Each kernel walks the chunks of one (batch, head) in order (the chunk grid axis is
"arbitrary": sequential) and carries a ``[dk, dv]`` float32 state in VMEM scratch:

  forward   o per chunk, carrying the state S forward (as ``reference.py``)
  backward  dq, carrying S forward again (recomputed, not stored)
            dk, dv, walking the chunks last to first and carrying the cotangent dS
            of the state (as ``chunked.py``); dg is a reverse cumulative sum in XLA.

Inside a chunk everything is 2-D, as Mosaic wants: the inclusive cumulative log gate
is a matmul with a lower-triangular matrix of ones; a per-key-dimension decay builds
the intra-chunk scores one key dimension at a time from ``[C, C]`` decay matrices
``exp(min(G_i - G_j, 0))`` (masked to ``j <= i``), so no exponent is ever positive;
a per-head decay needs one such matrix. The reverse direction flips the tokens.

Layout ``[batch, heads, tokens, dim]`` with blocks of ``chunk`` tokens (a multiple of
8) and whole head dims (TPU tiling; see ``vit_jax.kernels._backend``). There is no
GPU kernel: Pallas' Triton lowering is deprecated and a Mosaic GPU kernel has not
been written, so on GPU the gated scan runs as XLA's chunked form (``chunked.py``);
asking for ``"pallas"`` there is an error. On CPU the kernels run in interpret mode.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vit_jax.kernels import _backend as bk
from vit_jax.kernels.gated_scan import chunked
from vit_jax.kernels.gated_scan import reference as ref

Array = jax.Array
f32 = jnp.float32

DEFAULT_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (a ``custom_vjp`` non-diff argument)."""
  chunk: int
  per_head: bool
  interpret: bool


# ----------------------------------------------------------------------------
# Kernel bodies: refs are [chunk, dim] blocks of one (batch, head).
# ----------------------------------------------------------------------------

def _cumulative(g_ref):
  """Inclusive cumulative log gate ``[C, dk]``, its transpose, and the causal mask."""
  c = g_ref.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  causal = cols <= rows
  cum = bk.dot(causal.astype(f32), g_ref[...].astype(f32))
  return cum, cum.T, causal


def _pair_decay(cum, cum_t, causal, n: int):
  """``exp(G_i - G_j)`` of key dimension ``n`` for ``j <= i``, else 0: ``[C, C]``."""
  diff = cum[:, n:n + 1] - cum_t[n:n + 1, :]
  return jnp.where(causal, jnp.exp(jnp.minimum(diff, 0.0)), 0.0)


def _scores(q, k, cum, cum_t, causal, per_head: bool):
  """``A_ij = q_i . (k_j * exp(G_i - G_j))``, masked to ``j <= i``."""
  if per_head:
    return bk.dot(q, k, trans_b=True) * _pair_decay(cum, cum_t, causal, 0)
  k_t = k.T
  scores = jnp.zeros(causal.shape, f32)
  for n in range(q.shape[1]):
    scores += q[:, n:n + 1] * k_t[n:n + 1, :] * _pair_decay(cum, cum_t, causal, n)
  return scores


def _decayed_to_end(cum):
  """``exp(G_L - G_j)`` per token and key dimension, ``[C, dk]``."""
  return jnp.exp(cum[-1:, :] - cum)


def _carry_state(state, k, v, cum, cum_t):
  """The state leaving the chunk: ``exp(G_L) S + sum_j (k_j exp(G_L - G_j))^T v_j``."""
  return jnp.exp(cum_t[:, -1:]) * state + bk.dot(k * _decayed_to_end(cum), v, trans_a=True)


def _load(*refs):
  return tuple(r[...].astype(f32) for r in refs)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, o_ref, state_ref, *, cfg: _Config):
  @pl.when(pl.program_id(2) == 0)
  def _():
    state_ref[...] = jnp.zeros(state_ref.shape, f32)

  q, k, v = _load(q_ref, k_ref, v_ref)
  cum, cum_t, causal = _cumulative(g_ref)
  state = state_ref[...]
  out = (bk.dot(_scores(q, k, cum, cum_t, causal, cfg.per_head), v)
         + bk.dot(q * jnp.exp(cum), state))
  o_ref[...] = out.astype(o_ref.dtype)
  state_ref[...] = _carry_state(state, k, v, cum, cum_t)


def _query_grad_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dq_ref, state_ref, *,
                       cfg: _Config):
  @pl.when(pl.program_id(2) == 0)
  def _():
    state_ref[...] = jnp.zeros(state_ref.shape, f32)

  q, k, v, do = _load(q_ref, k_ref, v_ref, do_ref)
  cum, cum_t, causal = _cumulative(g_ref)
  d_scores = bk.dot(do, v, trans_b=True)
  if cfg.per_head:
    dq = bk.dot(d_scores * _pair_decay(cum, cum_t, causal, 0), k)
  else:
    k_t = k.T
    lanes = jax.lax.broadcasted_iota(jnp.int32, (1, q.shape[1]), 1)
    dq = jnp.zeros(q.shape, f32)
    for n in range(q.shape[1]):
      weighted = d_scores * _pair_decay(cum, cum_t, causal, n) * k_t[n:n + 1, :]
      dq += jnp.sum(weighted, axis=1, keepdims=True) * (lanes == n).astype(f32)
  state = state_ref[...]
  dq += jnp.exp(cum) * bk.dot(do, state, trans_b=True)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  state_ref[...] = _carry_state(state, k, v, cum, cum_t)


def _key_value_grad_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dv_ref,
                           d_state_ref, *, cfg: _Config):
  # Chunks arrive last to first; d_state is the cotangent of the state leaving this one.
  @pl.when(pl.program_id(2) == 0)
  def _():
    d_state_ref[...] = jnp.zeros(d_state_ref.shape, f32)

  q, k, v, do = _load(q_ref, k_ref, v_ref, do_ref)
  cum, cum_t, causal = _cumulative(g_ref)
  d_state = d_state_ref[...]
  to_end = _decayed_to_end(cum)
  scores = _scores(q, k, cum, cum_t, causal, cfg.per_head)
  dv = bk.dot(scores, do, trans_a=True) + bk.dot(k * to_end, d_state)
  d_scores = bk.dot(do, v, trans_b=True)
  if cfg.per_head:
    dk = bk.dot(d_scores * _pair_decay(cum, cum_t, causal, 0), q, trans_a=True)
  else:
    sublanes = jax.lax.broadcasted_iota(jnp.int32, (q.shape[1], 1), 0)
    dk_t = jnp.zeros((q.shape[1], q.shape[0]), f32)
    for n in range(q.shape[1]):
      weighted = d_scores * _pair_decay(cum, cum_t, causal, n) * q[:, n:n + 1]
      dk_t += jnp.sum(weighted, axis=0, keepdims=True) * (sublanes == n).astype(f32)
    dk = dk_t.T
  dk += to_end * bk.dot(v, d_state, trans_b=True)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  d_state_ref[...] = (jnp.exp(cum_t[:, -1:]) * d_state
                      + bk.dot(q * jnp.exp(cum), do, trans_a=True))


# ----------------------------------------------------------------------------
# pallas_calls
# ----------------------------------------------------------------------------

def _to_kernel(x: Array, padded: int) -> Array:
  """``[B, T, H, d]`` -> ``[B, H, padded, d]`` (zeros after the last token)."""
  return jnp.swapaxes(bk.pad_axis(x, 1, padded), 1, 2)


def _from_kernel(x: Array, tokens: int) -> Array:
  return jnp.swapaxes(x, 1, 2)[:, :tokens]


def _call(kernel, inputs, out_dims, out_dtypes, state_shape, cfg: _Config, name: str,
          backwards: bool = False):
  batch, heads, padded, _ = inputs[0].shape
  chunks = padded // cfg.chunk
  if backwards:
    index = lambda b, h, c: (b, h, chunks - 1 - c, 0)
  else:
    index = lambda b, h, c: (b, h, c, 0)
  spec = lambda d: pl.BlockSpec((None, None, cfg.chunk, d), index)
  dk, dv = state_shape
  flops = 2 * batch * heads * padded * (cfg.chunk * (dk + dv) + 2 * dk * dv)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg),
      grid=(batch, heads, chunks),
      in_specs=[spec(x.shape[3]) for x in inputs],
      out_specs=[spec(d) for d in out_dims],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, padded, d), t)
                 for d, t in zip(out_dims, out_dtypes)],
      scratch_shapes=[pltpu.VMEM(state_shape, f32)],
      compiler_params=bk.compiler_params("tpu", cfg.interpret, 3, arbitrary=(2,)),
      cost_estimate=bk.cost_estimate(
          flops, batch * heads * padded * cfg.chunk * (1 if cfg.per_head else dk),
          sum(x.size * x.dtype.itemsize for x in inputs)),
      interpret=cfg.interpret,
      name=name,
  )(*inputs)


def _kernel_inputs(q, k, v, g, cfg: _Config):
  padded = bk.round_up(q.shape[1], cfg.chunk)
  g = jnp.broadcast_to(g, q.shape)  # a per-head decay repeats over the key dims
  return [_to_kernel(x, padded) for x in (q, k, v, g)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan(q, k, v, g, cfg: _Config):
  inputs = _kernel_inputs(q, k, v, g, cfg)
  (out,) = _call(_forward_kernel, inputs, [v.shape[3]], [v.dtype],
                 (q.shape[3], v.shape[3]), cfg, "gated_scan_forward")
  return _from_kernel(out, q.shape[1])


def _scan_fwd(q, k, v, g, cfg):
  return _scan(q, k, v, g, cfg), (q, k, v, g)


def _scan_bwd(cfg: _Config, residuals, d_out):
  q, k, v, g = residuals
  tokens, dk, dv = q.shape[1], q.shape[3], v.shape[3]
  inputs = _kernel_inputs(q, k, v, g, cfg)
  inputs.append(_to_kernel(d_out.astype(v.dtype), inputs[0].shape[2]))
  (dq,) = _call(_query_grad_kernel, inputs, [dk], [q.dtype], (dk, dv), cfg,
                "gated_scan_query_grad")
  dk_, dv_ = _call(_key_value_grad_kernel, inputs, [dk, dv], [k.dtype, v.dtype],
                   (dk, dv), cfg, "gated_scan_key_value_grad", backwards=True)
  dq, dk_, dv_ = (_from_kernel(x, tokens) for x in (dq, dk_, dv_))
  dg = chunked.reverse_cumsum(q.astype(f32) * dq.astype(f32)
                              - k.astype(f32) * dk_.astype(f32))
  if g.shape[3] == 1:
    dg = jnp.sum(dg, axis=3, keepdims=True)
  return dq, dk_, dv_, dg.astype(g.dtype)


_scan.defvjp(_scan_fwd, _scan_bwd)


def gated_scan(q: Array, k: Array, v: Array, g: Array, *, reverse: bool = False,
               chunk: Optional[int] = None, interpret: Optional[bool] = None) -> Array:
  """Pallas (TPU) gated scan with the semantics of ``gated_scan_reference``.

  Args:
    q, k, v, g, reverse: as ``reference.gated_scan_reference``.
    chunk: tokens per kernel step, a multiple of 8 (default 64).
    interpret: run in interpret mode (default: unless on a TPU).
  """
  ref.check_inputs(q, k, v, g)
  here = bk.platform()
  if here == "gpu" and not interpret:
    raise ValueError("the gated scan has no GPU Pallas kernel (Triton lowering is "
                     "deprecated, Mosaic GPU is not written yet); use impl='xla', "
                     "the chunked form, on GPU")
  if interpret is None:
    interpret = here != "tpu"
  chunk = chunk or DEFAULT_CHUNK
  if chunk % bk.TPU_SUBLANES:
    raise ValueError(f"gated scan chunk must be a multiple of {bk.TPU_SUBLANES} "
                     f"tokens, got {chunk}")
  cfg = _Config(int(chunk), ref.decay_kind(g, q) == "head", bool(interpret))
  if reverse:
    flip = lambda x: jnp.flip(x, axis=1)
    return flip(_scan(flip(q), flip(k), flip(v), flip(g), cfg))
  return _scan(q, k, v, g, cfg)
