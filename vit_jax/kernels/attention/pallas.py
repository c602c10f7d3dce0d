"""Global softmax attention in Pallas: a flash-style kernel with padding and masking.

Forward: each program owns ``block_q`` queries and streams over blocks of
``block_k`` keys with an online softmax (running max ``m``, running sum ``l``), so the
``[q_len, kv_len]`` logits never exist in memory; it also writes the log-sum-exp per
query for the backward pass. Backward (FlashAttention-2's split): one kernel per key
block accumulates ``dk``/``dv`` over the queries, one per query block accumulates
``dq`` over the keys; ``delta = rowsum(do * o)`` comes from XLA. Token counts need not
divide the blocks: inputs are zero-padded and padded keys are masked out of the
softmax (197-token ViTs work); padded queries carry a zero cotangent.

Segment ids (sequence packing): queries ``[B, 1, tokens, 1]`` and keys
``[B, 1, 1, tokens]`` int32 ride along as two more inputs (the key row whole, so its
last two block dims are the array's on TPU); the logits of pairs in different
segments are masked like padding. A query always shares a segment with itself, so no
row is fully masked.

Block sizes: GPU (Triton) 64 x 64 tokens, head dims padded to a power of two; TPU
(Mosaic) blocks of 128 tokens over the ``[batch, heads, tokens, head_dim]`` layout. On
TPU the keys/values of one head are a single VMEM block, which bounds the sequence
length (about 16k tokens at head_dim 64 in bfloat16); see ``_backend``.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vit_jax.kernels import _backend as bk
from vit_jax.kernels.attention import reference

Array = jax.Array
f32 = jnp.float32

BLOCKS = {"triton": (64, 64), "tpu": (128, 128)}  # (block_q, block_k)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
  backend: str
  interpret: bool
  block_q: int
  block_k: int


def _block(n: int, block: int, backend: str) -> int:
  if backend == "triton":
    return min(block, max(bk.TRITON_MIN_DIM, bk.next_pow2(n)))
  return min(block, bk.round_up(n, bk.TPU_SUBLANES))


def _to_kernel(x, n_pad, d_pad, backend):
  x = bk.pad_axis(bk.pad_axis(x, 1, n_pad), 3, d_pad)
  return x if backend == "triton" else jnp.swapaxes(x, 1, 2)


def _from_kernel(x, n, d, backend):
  if backend != "triton":
    x = jnp.swapaxes(x, 1, 2)
  return x[:, :n, :, :d]


def _token_spec(backend, rows, cols, index):
  if backend == "triton":
    return pl.BlockSpec((None, rows, None, cols),
                        lambda *g: (index(*g)[0], index(*g)[2], index(*g)[1], 0))
  return pl.BlockSpec((None, None, rows, cols),
                      lambda *g: (index(*g)[0], index(*g)[1], index(*g)[2], 0))


def _row_spec(rows, index):
  """``[B, H, tokens, 1]`` per-query statistics (lse, delta)."""
  return pl.BlockSpec((None, None, rows, 1),
                      lambda *g: (index(*g)[0], index(*g)[1], index(*g)[2], 0))


def _cdt(dtype):
  return f32 if jnp.dtype(dtype) == jnp.float32 else dtype


def _logits(q, k, scale, col0, nk_valid, q_seg=None, k_seg=None):
  s = bk.dot(q, k, trans_b=True) * scale
  cols = col0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  keep = cols < nk_valid
  if q_seg is not None:  # [rows, 1] against [1, block_k]
    keep = jnp.logical_and(keep, q_seg == k_seg)
  return jnp.where(keep, s, MASK_VALUE)


def _split_refs(refs, n_in: int, segmented: bool):
  """(inputs, (q_seg_ref, k_seg_ref) or None, outputs) of a kernel's refs."""
  if not segmented:
    return refs[:n_in], None, refs[n_in:]
  return refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

def _fwd_kernel(*refs, scale, block_k, nk_valid, segmented):
  (q_ref, k_ref, v_ref), seg, (o_ref, lse_ref) = _split_refs(refs, 3, segmented)
  cdt = _cdt(q_ref.dtype)
  q = q_ref[...].astype(cdt)
  rows = q.shape[0]
  q_seg = seg[0][...] if seg else None

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :].astype(cdt)
    v = v_ref[pl.ds(start, block_k), :].astype(cdt)
    k_seg = seg[1][:, pl.ds(start, block_k)] if seg else None
    s = _logits(q, k, scale, start, nk_valid, q_seg, k_seg)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + bk.dot(p.astype(cdt), v)
    return m_new, l, acc

  init = (jnp.full((rows, 1), MASK_VALUE, f32), jnp.zeros((rows, 1), f32),
          jnp.zeros(o_ref.shape, f32))
  m, l, acc = jax.lax.fori_loop(0, bk.cdiv(nk_valid, block_k), body, init)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dkv_kernel(*refs, scale, block_q, block_k, nq_valid, nk_valid, segmented):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg, (dk_ref, dv_ref) = (
      _split_refs(refs, 6, segmented))
  cdt = _cdt(q_ref.dtype)
  k = k_ref[...].astype(cdt)
  v = v_ref[...].astype(cdt)
  col0 = pl.program_id(2) * block_k
  k_seg = seg[1][...] if seg else None

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
    q = q_ref[rows, :].astype(cdt)
    do = do_ref[rows, :].astype(cdt)
    q_seg = seg[0][rows, :] if seg else None
    p = jnp.exp(_logits(q, k, scale, col0, nk_valid, q_seg, k_seg) - lse_ref[rows, :])
    dv = dv + bk.dot(p.astype(cdt), do, trans_a=True)
    dp = bk.dot(do, v, trans_b=True)
    ds = p * (dp - delta_ref[rows, :])
    dk = dk + bk.dot(ds.astype(cdt), q, trans_a=True)
    return dk, dv

  init = (jnp.zeros(dk_ref.shape, f32), jnp.zeros(dv_ref.shape, f32))
  dk, dv = jax.lax.fori_loop(0, bk.cdiv(nq_valid, block_q), body, init)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, scale, block_k, nk_valid, segmented):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), seg, (dq_ref,) = _split_refs(
      refs, 6, segmented)
  cdt = _cdt(q_ref.dtype)
  q = q_ref[...].astype(cdt)
  do = do_ref[...].astype(cdt)
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_seg = seg[0][...] if seg else None

  def body(j, dq):
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :].astype(cdt)
    v = v_ref[pl.ds(start, block_k), :].astype(cdt)
    k_seg = seg[1][:, pl.ds(start, block_k)] if seg else None
    p = jnp.exp(_logits(q, k, scale, start, nk_valid, q_seg, k_seg) - lse)
    ds = p * (bk.dot(do, v, trans_b=True) - delta)
    return dq + bk.dot(ds.astype(cdt), k)

  dq = jax.lax.fori_loop(0, bk.cdiv(nk_valid, block_k), body,
                         jnp.zeros(dq_ref.shape, f32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------
# Wrapper with custom_vjp
# ----------------------------------------------------------------------------

def _tiling(q, k, cfg):
  nq, nk = q.shape[1], k.shape[1]
  bq = _block(nq, cfg.block_q, cfg.backend)
  bkv = _block(nk, cfg.block_k, cfg.backend)
  return nq, nk, bq, bkv, bk.round_up(nq, bq), bk.round_up(nk, bkv)


def _segment_inputs(segment_ids, nq_pad, nk_pad):
  """Query ids ``[B, 1, nq_pad, 1]`` and key ids ``[B, 1, 1, nk_pad]`` (pads: -1)."""
  if segment_ids is None:
    return ()
  ids = segment_ids.astype(jnp.int32)
  pad = lambda n: jnp.pad(ids, ((0, 0), (0, n - ids.shape[1])), constant_values=-1)
  return pad(nq_pad)[:, None, :, None], pad(nk_pad)[:, None, None, :]


def _segment_specs(segment_ids, q_rows, q_index, k_cols, k_index):
  """BlockSpecs of the two segment-id inputs (none without segment ids)."""
  if segment_ids is None:
    return []
  return [pl.BlockSpec((None, None, q_rows, 1),
                       lambda *g: (q_index(*g)[0], 0, q_index(*g)[2], 0)),
          pl.BlockSpec((None, None, 1, k_cols),
                       lambda *g: (k_index(*g)[0], 0, 0, k_index(*g)[2]))]


def _forward(q, k, v, segment_ids, cfg: _Config):
  batch, _, heads, d = q.shape
  nq, nk, bq, bkv, nq_pad, nk_pad = _tiling(q, k, cfg)
  dp = bk.padded_head_dim(d, cfg.backend)
  qp, kp, vp = (_to_kernel(x, n, dp, cfg.backend)
                for x, n in ((q, nq_pad), (k, nk_pad), (v, nk_pad)))
  grid = (batch, heads, nq_pad // bq)
  blocks = lambda b, h, i: (b, h, i)
  whole = lambda b, h, i: (b, h, 0)
  segmented = segment_ids is not None
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=d ** -0.5, block_k=bkv, nk_valid=nk,
                        segmented=segmented),
      grid=grid,
      in_specs=[_token_spec(cfg.backend, bq, dp, blocks),
                _token_spec(cfg.backend, nk_pad, dp, whole),
                _token_spec(cfg.backend, nk_pad, dp, whole),
                *_segment_specs(segment_ids, bq, blocks, nk_pad, whole)],
      out_specs=[_token_spec(cfg.backend, bq, dp, blocks), _row_spec(bq, blocks)],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, nq_pad, 1), f32)],
      compiler_params=bk.compiler_params(cfg.backend, cfg.interpret, 3),
      cost_estimate=bk.cost_estimate(4 * batch * heads * nq_pad * nk_pad * dp,
                                     batch * heads * nq_pad * nk_pad,
                                     (qp.size + kp.size + vp.size + qp.size)
                                     * q.dtype.itemsize),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(qp, kp, vp, *_segment_inputs(segment_ids, nq_pad, nk_pad))
  return _from_kernel(out, nq, d, cfg.backend), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, cfg):
  return _forward(q, k, v, segment_ids, cfg)[0]


def _fwd(q, k, v, segment_ids, cfg):
  out, lse = _forward(q, k, v, segment_ids, cfg)
  return out, (q, k, v, segment_ids, out, lse)


def _bwd(cfg: _Config, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  segmented = segment_ids is not None
  segments = _segment_inputs(segment_ids, *_tiling(q, k, cfg)[4:])
  batch, _, heads, d = q.shape
  nq, nk, bq, bkv, nq_pad, nk_pad = _tiling(q, k, cfg)
  dp = bk.padded_head_dim(d, cfg.backend)
  d_out = d_out.astype(q.dtype)
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(f32), out.astype(f32))
  delta = bk.pad_axis(delta, 2, nq_pad)[..., None]
  qp, dop = (_to_kernel(x, nq_pad, dp, cfg.backend) for x in (q, d_out))
  kp, vp = (_to_kernel(x, nk_pad, dp, cfg.backend) for x in (k, v))
  scale = d ** -0.5
  params = bk.compiler_params(cfg.backend, cfg.interpret, 3)
  flops = 4 * batch * heads * nq_pad * nk_pad * dp
  blocks = lambda b, h, i: (b, h, i)
  whole = lambda b, h, i: (b, h, 0)
  itemsize = q.dtype.itemsize

  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, block_q=bq, block_k=bkv,
                        nq_valid=nq, nk_valid=nk, segmented=segmented),
      grid=(batch, heads, nk_pad // bkv),
      in_specs=[_token_spec(cfg.backend, nq_pad, dp, whole),
                _token_spec(cfg.backend, bkv, dp, blocks),
                _token_spec(cfg.backend, bkv, dp, blocks),
                _token_spec(cfg.backend, nq_pad, dp, whole),
                _row_spec(nq_pad, whole), _row_spec(nq_pad, whole),
                *_segment_specs(segment_ids, nq_pad, whole, bkv, blocks)],
      out_specs=[_token_spec(cfg.backend, bkv, dp, blocks),
                 _token_spec(cfg.backend, bkv, dp, blocks)],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=params,
      cost_estimate=bk.cost_estimate(flops, batch * heads * nq_pad * nk_pad,
                                     (2 * qp.size + 4 * kp.size) * itemsize),
      interpret=cfg.interpret,
      name="flash_attention_dkv",
  )(qp, kp, vp, dop, lse, delta, *segments)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=bkv, nk_valid=nk,
                        segmented=segmented),
      grid=(batch, heads, nq_pad // bq),
      in_specs=[_token_spec(cfg.backend, bq, dp, blocks),
                _token_spec(cfg.backend, nk_pad, dp, whole),
                _token_spec(cfg.backend, nk_pad, dp, whole),
                _token_spec(cfg.backend, bq, dp, blocks),
                _row_spec(bq, blocks), _row_spec(bq, blocks),
                *_segment_specs(segment_ids, bq, blocks, nk_pad, whole)],
      out_specs=_token_spec(cfg.backend, bq, dp, blocks),
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
      compiler_params=params,
      cost_estimate=bk.cost_estimate(flops * 3 // 4, batch * heads * nq_pad * nk_pad,
                                     (3 * qp.size + 2 * kp.size) * itemsize),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(qp, kp, vp, dop, lse, delta, *segments)
  return (_from_kernel(dq, nq, d, cfg.backend), _from_kernel(dk, nk, d, cfg.backend),
          _from_kernel(dv, nk, d, cfg.backend), None)


_attention.defvjp(_fwd, _bwd)


def flash_attention(query: Array, key: Array, value: Array, *,
                    backend: Optional[str] = None, interpret: Optional[bool] = None,
                    block_q: Optional[int] = None,
                    block_k: Optional[int] = None,
                    segment_ids: Optional[Array] = None) -> Array:
  """Softmax attention, ``[batch, tokens, heads, head_dim]``, no bias or mask.

  Matches ``vit_jax.kernels.attention.attention_reference`` (scale ``head_dim**-0.5``,
  softmax in float32), with its ``segment_ids`` (``[batch, tokens]`` integers,
  self-attention). ``backend``/``interpret`` as in ``linear_attention``;
  ``block_q``/``block_k`` override the token blocks.
  """
  if query.ndim != 4 or key.shape != value.shape or query.shape[0] != key.shape[0] or (
      query.shape[2:] != key.shape[2:]):
    raise ValueError("flash attention takes query [batch, q_len, heads, head_dim] and "
                     "key/value [batch, kv_len, heads, head_dim]; got "
                     f"{query.shape}, {key.shape}, {value.shape}")
  backend, interpret = bk.resolve(backend, interpret)
  default_q, default_k = BLOCKS[backend]
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block is None:
      continue
    if backend == "triton" and bk.next_pow2(block) != block:
      raise ValueError(f"GPU (Triton) {name} must be a power of two, got {block}")
    if backend == "tpu" and block % bk.TPU_SUBLANES:
      raise ValueError(f"TPU {name} must be a multiple of {bk.TPU_SUBLANES}, got {block}")
  if segment_ids is not None:  # the reference's checks and error messages
    reference.check_segment_ids(segment_ids, query.shape[1], key.shape[1])
  cfg = _Config(backend, interpret, block_q or default_q, block_k or default_k)
  return _attention(query, key, value, segment_ids, cfg)
