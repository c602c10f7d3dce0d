"""Linear attention in Pallas: forward and backward kernels behind a ``custom_vjp``.

Four kernels, each linear in the number of tokens (``S`` and ``z`` as in
``reference.py``; ``D``/``E`` the query/value head dims):

  forward   1. state:  S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)   (per chunk)
            2. output: o_i = phi(q_i) S / (phi(q_i) . z + eps)          (per block)
  backward  3. query:  dq_i and the sums dS = sum_i phi(q_i) g_i^T, dz (per chunk)
            4. keys:   dk_j = (v_j dS^T + dz) * phi'(k_j), dv_j = phi(k_j) dS

Reductions over tokens loop inside a program over ``steps`` blocks of ``block``
tokens (one "chunk") and write one partial ``[D, E]`` state per chunk, which XLA sums:
GPU programs run concurrently, so accumulating across grid steps would race; on TPU
the same structure pipelines the chunk's DMA. Padded tokens (any token count works)
and padded feature columns get ``phi(k) = 0``, which is required for ``elu+1``
(``phi(0) = 1``); padded query rows carry a zero output cotangent.

Block sizes: GPU (Triton) token blocks are powers of two and head dims are padded to
a power of two >= 16; TPU (Mosaic) uses the ``[batch, heads, tokens, head_dim]``
layout with blocks of 128 tokens (or the whole, 8-aligned, token axis when shorter)
and whole head dims. See ``vit_jax.kernels._backend``.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vit_jax.kernels import _backend as bk
from vit_jax.kernels.linear_attention import reference

Array = jax.Array
f32 = jnp.float32

# (token block, blocks per chunk) per backend. A chunk is what one program reduces.
BLOCKS = {"triton": (64, 16), "tpu": (128, 8)}


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: a ``custom_vjp`` non-diff argument)."""
  feature_map: str
  normalize: bool
  eps: float
  backend: str
  interpret: bool
  block: int
  steps: int


def _token_tiling(n: int, cfg: _Config) -> tuple[int, int, int]:
  """``(block, steps, padded_n)`` for ``n`` tokens: chunks of ``block * steps``."""
  block = cfg.block
  if cfg.backend == "tpu" and n < block:  # whole (8-aligned) axis: a legal TPU block
    block = bk.round_up(n, bk.TPU_SUBLANES)
  if cfg.backend == "triton":
    block = min(block, max(bk.TRITON_MIN_DIM, bk.next_pow2(n)))
  steps = max(1, min(cfg.steps, bk.cdiv(n, block)))
  return block, steps, bk.round_up(n, block * steps)


# ----------------------------------------------------------------------------
# Layout: GPU keeps [B, N, H, D]; TPU kernels see [B, H, N, D].
# ----------------------------------------------------------------------------

def _to_kernel(x: Array, n_pad: int, d_pad: int, backend: str) -> Array:
  x = bk.pad_axis(bk.pad_axis(x, 1, n_pad), 3, d_pad)
  return x if backend == "triton" else jnp.swapaxes(x, 1, 2)


def _from_kernel(x: Array, n: int, d: int, backend: str) -> Array:
  if backend != "triton":
    x = jnp.swapaxes(x, 1, 2)
  return x[:, :n, :, :d]


def _token_spec(backend: str, rows: int, cols: int, index):
  """Blocks of ``rows`` tokens; ``index(*grid) -> (batch, head, row_block)``."""
  if backend == "triton":
    def gpu_map(*g):
      b, h, t = index(*g)
      return b, t, h, 0
    return pl.BlockSpec((None, rows, None, cols), gpu_map)

  def tpu_map(*g):
    b, h, t = index(*g)
    return b, h, t, 0
  return pl.BlockSpec((None, None, rows, cols), tpu_map)


def _state_spec(shape_tail: tuple[int, int], index):
  """``[B, H, C, *tail]`` state blocks (whole trailing dims: legal everywhere)."""
  return pl.BlockSpec((None, None, None) + shape_tail, index)


# ----------------------------------------------------------------------------
# Kernel bodies (shared by both backends: refs are [tokens, dim] blocks).
# ----------------------------------------------------------------------------

_phi_and_grad = reference.feature_map_and_grad


def _valid(shape, row0, n_valid: int, d_valid: int) -> Array:
  rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return (rows < n_valid) & (cols < d_valid)


def _compute_dtype(dtype):
  # bfloat16/float16 inputs keep half-precision dot operands (tensor cores / MXU,
  # float32 accumulation); float32 inputs stay float32.
  return f32 if jnp.dtype(dtype) == jnp.float32 else dtype


def _state_kernel(k_ref, v_ref, s_ref, z_ref, *, cfg: _Config, block: int, steps: int,
                  n_valid: int, d_valid: int):
  base = pl.program_id(2) * (block * steps)
  cdt = _compute_dtype(v_ref.dtype)

  def body(i, carry):
    s, z = carry
    start = pl.multiple_of(i * block, block)
    k = k_ref[pl.ds(start, block), :].astype(f32)
    v = v_ref[pl.ds(start, block), :].astype(cdt)
    phi, _ = _phi_and_grad(k, cfg.feature_map)
    phi = jnp.where(_valid(phi.shape, base + start, n_valid, d_valid), phi, 0.0)
    s = s + bk.dot(phi.astype(cdt), v, trans_a=True)
    z = z + jnp.sum(phi, axis=0, keepdims=True)
    return s, z

  init = (jnp.zeros(s_ref.shape, f32), jnp.zeros(z_ref.shape, f32))
  s, z = jax.lax.fori_loop(0, steps, body, init)
  s_ref[...] = s
  z_ref[...] = z


def _output_kernel(q_ref, s_ref, z_ref, o_ref, *, cfg: _Config):
  cdt = _compute_dtype(o_ref.dtype)
  phi, _ = _phi_and_grad(q_ref[...].astype(f32), cfg.feature_map)
  num = bk.dot(phi.astype(cdt), s_ref[...].astype(cdt))
  if cfg.normalize:
    den = jnp.sum(phi * z_ref[...], axis=1, keepdims=True) + cfg.eps
    num = num / den
  o_ref[...] = num.astype(o_ref.dtype)


def _query_grad_kernel(q_ref, do_ref, s_ref, z_ref, dq_ref, ds_ref, dz_ref, *,
                       cfg: _Config, block: int, steps: int):
  cdt = _compute_dtype(do_ref.dtype)
  s = s_ref[...]
  z = z_ref[...]
  s_c = s.astype(cdt)

  def body(i, carry):
    ds, dz = carry
    rows = pl.ds(pl.multiple_of(i * block, block), block)
    phi, dphi = _phi_and_grad(q_ref[rows, :].astype(f32), cfg.feature_map)
    do = do_ref[rows, :].astype(f32)
    if cfg.normalize:
      num = bk.dot(phi.astype(cdt), s_c)
      den = jnp.sum(phi * z, axis=1, keepdims=True) + cfg.eps
      g_num = do / den
      g_den = -jnp.sum(do * num, axis=1, keepdims=True) / (den * den)
      dphi_q = bk.dot(g_num.astype(cdt), s_c, trans_b=True) + g_den * z
      dz = dz + jnp.sum(g_den * phi, axis=0, keepdims=True)
    else:
      g_num = do
      dphi_q = bk.dot(do.astype(cdt), s_c, trans_b=True)
    ds = ds + bk.dot(phi.astype(cdt), g_num.astype(cdt), trans_a=True)
    dq_ref[rows, :] = (dphi_q * dphi).astype(dq_ref.dtype)
    return ds, dz

  init = (jnp.zeros(ds_ref.shape, f32), jnp.zeros(dz_ref.shape, f32))
  ds, dz = jax.lax.fori_loop(0, steps, body, init)
  ds_ref[...] = ds
  dz_ref[...] = dz


def _key_grad_kernel(k_ref, v_ref, ds_ref, dz_ref, dk_ref, dv_ref, *, cfg: _Config,
                     block: int, n_valid: int, d_valid: int):
  cdt = _compute_dtype(v_ref.dtype)
  phi, dphi = _phi_and_grad(k_ref[...].astype(f32), cfg.feature_map)
  valid = _valid(phi.shape, pl.program_id(2) * block, n_valid, d_valid)
  phi = jnp.where(valid, phi, 0.0)
  ds = ds_ref[...].astype(cdt)
  dphi_k = bk.dot(v_ref[...].astype(cdt), ds, trans_b=True)
  if cfg.normalize:
    dphi_k = dphi_k + dz_ref[...]
  dk_ref[...] = jnp.where(valid, dphi_k * dphi, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = bk.dot(phi.astype(cdt), ds).astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_calls
# ----------------------------------------------------------------------------

def _state(k, v, cfg: _Config, n: int, d: int):
  """Kernel-layout k, v -> summed f32 ``S [B, H, D, E]`` and ``z [B, H, 1, D]``."""
  batch, heads = (k.shape[0], k.shape[2]) if cfg.backend == "triton" else k.shape[:2]
  n_pad, dp, ep = (k.shape[1], k.shape[3], v.shape[3]) if cfg.backend == "triton" else (
      k.shape[2], k.shape[3], v.shape[3])
  block, steps, _ = _token_tiling(n, cfg)
  chunks = n_pad // (block * steps)
  kernel = functools.partial(_state_kernel, cfg=cfg, block=block, steps=steps,
                             n_valid=n, d_valid=d)
  chunk_rows = block * steps
  s, z = pl.pallas_call(
      kernel,
      grid=(batch, heads, chunks),
      in_specs=[_token_spec(cfg.backend, chunk_rows, dp, lambda b, h, c: (b, h, c)),
                _token_spec(cfg.backend, chunk_rows, ep, lambda b, h, c: (b, h, c))],
      out_specs=[_state_spec((dp, ep), lambda b, h, c: (b, h, c, 0, 0)),
                 _state_spec((1, dp), lambda b, h, c: (b, h, c, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, chunks, dp, ep), f32),
                 jax.ShapeDtypeStruct((batch, heads, chunks, 1, dp), f32)],
      compiler_params=bk.compiler_params(cfg.backend, cfg.interpret, 3),
      cost_estimate=bk.cost_estimate(2 * batch * heads * n_pad * dp * ep, 0,
                                     k.size * k.dtype.itemsize + v.size * v.dtype.itemsize),
      interpret=cfg.interpret,
      name="linear_attention_state",
  )(k, v)
  return jnp.sum(s, axis=2), jnp.sum(z, axis=2)


def _output(q, s, z, cfg: _Config, n: int, out_dtype):
  batch, heads = s.shape[:2]
  dp, ep = s.shape[2:]
  n_pad = q.shape[1] if cfg.backend == "triton" else q.shape[2]
  block, _, _ = _token_tiling(n, cfg)
  out_shape = ((batch, n_pad, heads, ep) if cfg.backend == "triton"
               else (batch, heads, n_pad, ep))
  whole = lambda b, h, t: (b, h, 0, 0)
  return pl.pallas_call(
      functools.partial(_output_kernel, cfg=cfg),
      grid=(batch, heads, n_pad // block),
      in_specs=[_token_spec(cfg.backend, block, dp, lambda b, h, t: (b, h, t)),
                pl.BlockSpec((None, None, dp, ep), whole),
                pl.BlockSpec((None, None, 1, dp), whole)],
      out_specs=_token_spec(cfg.backend, block, ep, lambda b, h, t: (b, h, t)),
      out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
      compiler_params=bk.compiler_params(cfg.backend, cfg.interpret, 3),
      cost_estimate=bk.cost_estimate(2 * batch * heads * n_pad * dp * ep, 0,
                                     2 * q.size * q.dtype.itemsize),
      interpret=cfg.interpret,
      name="linear_attention_output",
  )(q, s, z)


def _check_and_config(query, key, value, feature_map, normalize, eps, backend,
                      interpret, block_tokens, chunk_blocks) -> _Config:
  reference.check_inputs(query, key, value, feature_map)
  backend, interpret = bk.resolve(backend, interpret)
  block, steps = BLOCKS[backend]
  if block_tokens is not None:
    if backend == "triton" and bk.next_pow2(block_tokens) != block_tokens:
      raise ValueError(f"GPU (Triton) token blocks must be powers of two, got {block_tokens}")
    if backend == "tpu" and block_tokens % bk.TPU_SUBLANES:
      raise ValueError(f"TPU token blocks must be multiples of {bk.TPU_SUBLANES}, "
                       f"got {block_tokens}")
    block = block_tokens
  steps = chunk_blocks or steps
  return _Config(feature_map, bool(normalize), float(eps), backend, interpret, block, steps)


def _padded(x, n, cfg):
  _, _, n_pad = _token_tiling(n, cfg)
  return _to_kernel(x, n_pad, bk.padded_head_dim(x.shape[3], cfg.backend), cfg.backend)


def _forward(q, k, v, cfg: _Config):
  nq, nk, d, e = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
  qp, kp, vp = _padded(q, nq, cfg), _padded(k, nk, cfg), _padded(v, nk, cfg)
  s, z = _state(kp, vp, cfg, nk, d)
  out = _output(qp, s, z, cfg, nq, v.dtype)
  return _from_kernel(out, nq, e, cfg.backend), (s, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_attention(q, k, v, cfg):
  return _forward(q, k, v, cfg)[0]


def _fwd(q, k, v, cfg):
  out, (s, z) = _forward(q, k, v, cfg)
  return out, (q, k, v, s, z)


def _bwd(cfg: _Config, residuals, d_out):
  q, k, v, s, z = residuals
  nq, nk, d, e = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
  qp, kp, vp = _padded(q, nq, cfg), _padded(k, nk, cfg), _padded(v, nk, cfg)
  dop = _padded(d_out.astype(v.dtype), nq, cfg)
  batch, heads, dp, ep = s.shape

  # 3. dq and the per-chunk sums dS, dz over the queries.
  block, steps, nq_pad = _token_tiling(nq, cfg)
  chunks = nq_pad // (block * steps)
  rows = block * steps
  chunk = lambda b, h, c: (b, h, c)
  whole = lambda b, h, c: (b, h, 0, 0)
  dq, ds, dz = pl.pallas_call(
      functools.partial(_query_grad_kernel, cfg=cfg, block=block, steps=steps),
      grid=(batch, heads, chunks),
      in_specs=[_token_spec(cfg.backend, rows, dp, chunk),
                _token_spec(cfg.backend, rows, ep, chunk),
                pl.BlockSpec((None, None, dp, ep), whole),
                pl.BlockSpec((None, None, 1, dp), whole)],
      out_specs=[_token_spec(cfg.backend, rows, dp, chunk),
                 _state_spec((dp, ep), lambda b, h, c: (b, h, c, 0, 0)),
                 _state_spec((1, dp), lambda b, h, c: (b, h, c, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, chunks, dp, ep), f32),
                 jax.ShapeDtypeStruct((batch, heads, chunks, 1, dp), f32)],
      compiler_params=bk.compiler_params(cfg.backend, cfg.interpret, 3),
      cost_estimate=bk.cost_estimate(6 * batch * heads * nq_pad * dp * ep, 0,
                                     3 * qp.size * qp.dtype.itemsize),
      interpret=cfg.interpret,
      name="linear_attention_query_grad",
  )(qp, dop, s, z)
  ds, dz = jnp.sum(ds, axis=2), jnp.sum(dz, axis=2)

  # 4. dk, dv per block of keys.
  block, _, nk_pad = _token_tiling(nk, cfg)
  tok = lambda b, h, t: (b, h, t)
  whole = lambda b, h, t: (b, h, 0, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_key_grad_kernel, cfg=cfg, block=block, n_valid=nk, d_valid=d),
      grid=(batch, heads, nk_pad // block),
      in_specs=[_token_spec(cfg.backend, block, dp, tok),
                _token_spec(cfg.backend, block, ep, tok),
                pl.BlockSpec((None, None, dp, ep), whole),
                pl.BlockSpec((None, None, 1, dp), whole)],
      out_specs=[_token_spec(cfg.backend, block, dp, tok),
                 _token_spec(cfg.backend, block, ep, tok)],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                 jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      compiler_params=bk.compiler_params(cfg.backend, cfg.interpret, 3),
      cost_estimate=bk.cost_estimate(4 * batch * heads * nk_pad * dp * ep, 0,
                                     4 * kp.size * kp.dtype.itemsize),
      interpret=cfg.interpret,
      name="linear_attention_key_grad",
  )(kp, vp, ds, dz)
  return (_from_kernel(dq, nq, d, cfg.backend), _from_kernel(dk, nk, d, cfg.backend),
          _from_kernel(dv, nk, e, cfg.backend))


_linear_attention.defvjp(_fwd, _bwd)


def linear_attention(query: Array, key: Array, value: Array, *,
                     feature_map: str = "relu", normalize: bool = True,
                     eps: float = 1e-5, backend: Optional[str] = None,
                     interpret: Optional[bool] = None,
                     block_tokens: Optional[int] = None,
                     chunk_blocks: Optional[int] = None) -> Array:
  """Pallas linear attention with the semantics of ``linear_attention_reference``.

  Args:
    query, key, value: ``[batch, tokens, heads, head_dim]``; any token count.
    backend: ``"triton"`` or ``"tpu"`` block configuration (default: the platform's;
      GPU's on CPU). interpret: run in interpret mode (default: on CPU).
    block_tokens, chunk_blocks: override the token block and the number of blocks
      one program reduces (tests use small values to cross block boundaries).
  """
  cfg = _check_and_config(query, key, value, feature_map, normalize, eps, backend,
                          interpret, block_tokens, chunk_blocks)
  return _linear_attention(query, key, value, cfg)
