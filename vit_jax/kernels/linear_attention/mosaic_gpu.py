"""Linear attention on Hopper-class GPUs through Mosaic GPU (``plgpu.kernel``).

Linear attention is two kinds of matmul over token blocks (``reference.py`` has the
math), and its backward pass is the same two kinds again, so two kernels build the
whole ``custom_vjp``:

- ``gram``:  ``G = sum_tokens phi(a)^T b`` -> ``[D, E]`` per (batch, head). Each
  program reduces one chunk of tokens (``emit_pipeline`` streams its blocks from
  global memory through shared memory) and writes one partial ``G``; XLA sums the
  chunks, because concurrent programs cannot accumulate into one output.
- ``apply``: ``out = phi(a) m`` -> ``[tokens, E]`` per block, ``m`` a per-(batch,
  head) ``[D, E]`` matrix held in shared memory while blocks stream past.

``phi`` (the feature map, or identity) is applied in registers, padded tokens and
padded feature columns are zeroed there (``phi(0) = 1`` for ``elu+1``), and the
result is written to shared memory for the tensor cores (``wgmma``, float32
accumulation). Forward: ``S = gram(k, v)``, ``num = apply(q, S)``; the
normaliser ``phi(q) . z`` and the division are vector work left to XLA. Backward:
``dS = gram(q, g)``, ``dq = apply(g, S^T)``, ``dk = apply(v, dS^T)``,
``dv = apply(k, dS)`` plus XLA's elementwise terms.

Limits (checked, with a clear error): bfloat16/float16 inputs only (``wgmma`` on
float32 runs as TF32, which misses float32 parity: ``impl="auto"`` keeps float32 on
XLA); head dims are zero-padded to multiples of 64 (the 128-byte swizzle of a
bfloat16 tile); tokens are padded to the 64-row ``wgmma`` tile.

Verification without a GPU: GPU interpret mode runs the kernels on CPU (it
simulates shared memory, TMA copies, barriers and ``wgmma``), and
``jax.jit(...).lower(lowering_platforms=("cuda",))`` runs the Mosaic GPU lowering
to its MLIR, which checks layouts, tilings and transforms. Neither compiles PTX:
only a run on the hardware settles that (``python -m vit_jax.tools.device_check``).
"""

import dataclasses
import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from vit_jax.kernels import _backend as bk
from vit_jax.kernels.linear_attention import reference

Array = jax.Array
f32 = jnp.float32

BLOCK = 64  # rows of one wgmma tile (one warpgroup)
FEATURE_MULTIPLE = 64  # 128-byte swizzle of a 16-bit tile
CHUNK_BLOCKS = 16  # token blocks one gram program reduces
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Config:
  feature_map: str
  normalize: bool
  eps: float
  interpret: bool
  chunk_blocks: int


def _tile_transforms():
  return (plgpu.TilingTransform((8, FEATURE_MULTIPLE)), plgpu.SwizzleTransform(128))


def _load_tile(ref, interpret):
  """A shared-memory tile in registers, in the ``wgmma`` layout.

  The layout annotations (``plgpu.layout_cast``, ``plgpu.broadcasted_iota``) are
  what the Mosaic GPU lowering needs; GPU interpret mode cannot evaluate them, and
  does not need them, so interpret mode reads the tile plainly.
  """
  if interpret:
    return ref[...]
  return plgpu.layout_cast(ref[...], plgpu.Layout.WGMMA)


def _iota(shape, dim, interpret):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dim)
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _phi_tile(ref, name: Optional[str], valid_rows, valid_cols, interpret):
  """``phi(tile)`` in float32, zero outside ``valid_rows(iota0) & valid_cols(iota1)``."""
  x = _load_tile(ref, interpret).astype(f32)
  if name == "relu":
    x = jnp.maximum(x, 0.0)
  elif name == "elu+1":
    x = jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))
  rows, cols = _iota(x.shape, 0, interpret), _iota(x.shape, 1, interpret)
  return jnp.where(valid_rows(rows) & valid_cols(cols), x, 0.0)


def _gram(a_t, b, *, fmap: Optional[str], n_valid: int, d_valid: int,
          chunk_blocks: int, interpret):
  """``sum_tokens phi(a)^T b`` for padded ``a_t [B, H, D, N]`` (``a`` transposed by
  XLA: GPU interpret mode cannot run a transposed ``wgmma`` operand) and
  ``b [B, N, H, E]``."""
  batch, heads, dp, n_pad = a_t.shape
  ep = b.shape[3]
  steps, chunks = _chunking(n_pad, chunk_blocks)

  def body(a_ref, b_ref, out_ref, phi_smem, out_smem):
    bi, hi, ci = (lax.axis_index(name) for name in ("batch", "heads", "chunks"))
    base = ci * (BLOCK * steps)

    def accumulate(acc_ref):
      def step(indices, a_smem, b_smem):
        (t,) = indices
        col0 = base + t * BLOCK
        phi = _phi_tile(a_smem, fmap, lambda r: r < d_valid,
                        lambda c: col0 + c < n_valid, interpret)
        phi_smem[...] = phi.astype(phi_smem.dtype)
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, phi_smem, b_smem)
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step, grid=(steps,), max_concurrent_steps=2,
          in_specs=[plgpu.BlockSpec((dp, BLOCK), lambda t: (0, t),
                                    transforms=_tile_transforms()),
                    plgpu.BlockSpec((BLOCK, ep), lambda t: (t, 0),
                                    transforms=_tile_transforms())],
      )(a_ref.at[bi, hi, :, pl.ds(base, BLOCK * steps)],
        b_ref.at[bi, pl.ds(base, BLOCK * steps), hi])
      return acc_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC((dp, ep), f32))
    out_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_ref.at[bi, hi, ci])
    plgpu.wait_smem_to_gmem(0)

  partial_sums = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((batch, heads, chunks, dp, ep), f32),
      grid=(batch, heads, chunks),
      grid_names=("batch", "heads", "chunks"),
      scratch_types=(plgpu.SMEM((dp, BLOCK), a_t.dtype, transforms=_tile_transforms()),
                     plgpu.SMEM((dp, ep), f32)),
      interpret=interpret,
  )(a_t, b)
  return jnp.sum(partial_sums, axis=2)


def _chunking(n_pad: int, chunk_blocks: int) -> tuple[int, int]:
  """``(blocks per program, programs)`` over ``n_pad`` tokens (64-token blocks)."""
  blocks = n_pad // BLOCK
  steps = min(chunk_blocks, blocks)
  while blocks % steps:
    steps -= 1
  return steps, blocks // steps


def _apply(a, m, *, fmap: Optional[str], n_valid: int, d_valid: int, out_dtype,
           chunk_blocks: int, interpret):
  """``phi(a) @ m[b, h]`` for padded ``a [B, N, H, D]`` and ``m [B, H, D, E]``.

  Outputs are written with explicit shared->global copies (two slots, so one copy
  drains while the next block computes) rather than ``emit_pipeline`` output specs,
  whose predicated copies GPU interpret mode cannot run.
  """
  batch, n_pad, heads, dp = a.shape
  ep = m.shape[3]
  m = m.astype(a.dtype)
  steps, chunks = _chunking(n_pad, chunk_blocks)

  def body(a_ref, m_ref, out_ref, m_smem, phi_smem, o_smem, barrier):
    bi, hi, ci = (lax.axis_index(name) for name in ("batch", "heads", "chunks"))
    base = ci * (BLOCK * steps)
    plgpu.copy_gmem_to_smem(m_ref.at[bi, hi], m_smem, barrier)
    plgpu.barrier_wait(barrier)

    def step(indices, a_smem):
      (t,) = indices
      row0 = base + t * BLOCK
      phi = _phi_tile(a_smem, fmap, lambda r: row0 + r < n_valid, lambda c: c < d_valid,
                      interpret)
      phi_smem[...] = phi.astype(phi_smem.dtype)
      plgpu.commit_smem()

      def product(acc_ref):
        plgpu.wgmma(acc_ref, phi_smem, m_smem)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

      out = pl.run_scoped(product, plgpu.ACC((BLOCK, ep), f32))
      slot = o_smem.at[t % 2]
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the slot's last copy is done
      slot[...] = out.astype(o_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(slot, out_ref.at[bi, pl.ds(row0, BLOCK), hi])

    plgpu.emit_pipeline(
        step, grid=(steps,), max_concurrent_steps=2,
        in_specs=[plgpu.BlockSpec((BLOCK, dp), lambda t: (t, 0),
                                  transforms=_tile_transforms())],
    )(a_ref.at[bi, pl.ds(base, BLOCK * steps), hi])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((batch, n_pad, heads, ep), out_dtype),
      grid=(batch, heads, chunks),
      grid_names=("batch", "heads", "chunks"),
      scratch_types=(plgpu.SMEM((dp, ep), a.dtype, transforms=_tile_transforms()),
                     plgpu.SMEM((BLOCK, dp), a.dtype, transforms=_tile_transforms()),
                     plgpu.SMEM((2, BLOCK, ep), out_dtype,
                                transforms=_out_transforms(out_dtype)),
                     plgpu.Barrier(num_barriers=1)),
      interpret=interpret,
  )(a, m)


def _out_transforms(dtype):
  elems = 128 // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128))


# ----------------------------------------------------------------------------
# custom_vjp
# ----------------------------------------------------------------------------

def _pad(x, n_pad):
  return bk.pad_axis(bk.pad_axis(x, 1, n_pad), 3,
                     bk.round_up(x.shape[3], FEATURE_MULTIPLE))


def _tokens_last(x):
  return jnp.transpose(x, (0, 2, 3, 1))  # [B, N, H, D] -> [B, H, D, N]


def _phi_and_grad(x, name):
  return reference.feature_map_and_grad(x.astype(f32), name)


def _forward(q, k, v, cfg: _Config):
  nq, nk, d, e = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
  run = dict(interpret=cfg.interpret, chunk_blocks=cfg.chunk_blocks)
  qp, kp, vp = (_pad(x, bk.round_up(n, BLOCK)) for x, n in ((q, nq), (k, nk), (v, nk)))
  s = _gram(_tokens_last(kp), vp, fmap=cfg.feature_map, n_valid=nk, d_valid=d, **run)  # [B, H, Dp, Ep]
  num = _apply(qp, s, fmap=cfg.feature_map, n_valid=nq, d_valid=d, out_dtype=f32,
               **run)[:, :nq, :, :e]
  z = den = None
  if cfg.normalize:
    z = jnp.sum(_phi_and_grad(k, cfg.feature_map)[0], axis=1)  # [B, H, D]
    den = jnp.einsum("bnhd,bhd->bnh", _phi_and_grad(q, cfg.feature_map)[0], z,
                     precision=lax.Precision.HIGHEST)[..., None] + cfg.eps
    num = num / den
  return num.astype(v.dtype), (s, z, den)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_attention(q, k, v, cfg):
  return _forward(q, k, v, cfg)[0]


def _fwd(q, k, v, cfg):
  out, (s, z, den) = _forward(q, k, v, cfg)
  return out, (q, k, v, out, s, z, den)


def _bwd(cfg: _Config, residuals, d_out):
  q, k, v, out, s, z, den = residuals
  nq, nk, d, e = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
  run = dict(interpret=cfg.interpret, chunk_blocks=cfg.chunk_blocks)
  do = d_out.astype(f32)
  g = do / den if cfg.normalize else do  # cotangent of the numerator
  gp = _pad(g.astype(q.dtype), bk.round_up(nq, BLOCK))
  qp = _pad(q, bk.round_up(nq, BLOCK))
  kp, vp = (_pad(x, bk.round_up(nk, BLOCK)) for x in (k, v))
  ds = _gram(_tokens_last(qp), gp, fmap=cfg.feature_map, n_valid=nq, d_valid=d, **run)  # [B, H, Dp, Ep]
  st, dst = jnp.swapaxes(s, 2, 3), jnp.swapaxes(ds, 2, 3)
  dphi_q = _apply(gp, st, fmap=None, n_valid=nq, d_valid=e, out_dtype=f32,
                  **run)[:, :nq, :, :d]
  dphi_k = _apply(vp, dst, fmap=None, n_valid=nk, d_valid=e, out_dtype=f32,
                  **run)[:, :nk, :, :d]
  dv = _apply(kp, ds, fmap=cfg.feature_map, n_valid=nk, d_valid=d, out_dtype=f32,
              **run)[:, :nk, :, :e]
  phi_q, dphi_dq = _phi_and_grad(q, cfg.feature_map)
  _, dphi_dk = _phi_and_grad(k, cfg.feature_map)
  if cfg.normalize:
    # d den_i = -sum_e do_ie out_ie / den_i; den_i = phi(q_i) . z + eps.
    g_den = -jnp.sum(do * out.astype(f32), axis=-1, keepdims=True) / den
    dphi_q = dphi_q + g_den * z[:, None]
    dz = jnp.sum(g_den * phi_q, axis=1)  # [B, H, D]
    dphi_k = dphi_k + dz[:, None]
  return ((dphi_q * dphi_dq).astype(q.dtype), (dphi_k * dphi_dk).astype(k.dtype),
          dv.astype(v.dtype))


_linear_attention.defvjp(_fwd, _bwd)


def interpret_params():
  """GPU interpret mode: simulated shared memory, TMA copies, barriers and wgmma.

  Public as ``plgpu.InterpretGPUParams`` from JAX 0.11; JAX 0.10 has it only
  privately.
  """
  if hasattr(plgpu, "InterpretGPUParams"):
    return plgpu.InterpretGPUParams()
  from jax._src.pallas.mosaic_gpu.interpret import params  # pylint: disable=g-import-not-at-top
  return params.InterpretGPUParams()


def linear_attention(query: Array, key: Array, value: Array, *,
                     feature_map: str = "relu", normalize: bool = True,
                     eps: float = 1e-5, interpret: Optional[bool] = None,
                     chunk_blocks: int = CHUNK_BLOCKS) -> Array:
  """Mosaic GPU linear attention with the semantics of ``linear_attention_reference``.

  ``interpret`` (default: when not on a GPU) runs GPU interpret mode on the CPU.
  ``chunk_blocks``: 64-token blocks one program of the ``gram`` kernel reduces.
  """
  reference.check_inputs(query, key, value, feature_map)
  dtypes = {jnp.dtype(x.dtype) for x in (query, key, value)}
  if len(dtypes) != 1 or not dtypes <= set(HALF_DTYPES):
    raise ValueError("the Mosaic GPU linear-attention kernel takes bfloat16 or float16 "
                     f"query/key/value of one dtype, got {sorted(map(str, dtypes))}; use "
                     "impl='xla' (or 'auto', which picks it) for float32")
  if interpret is None:
    interpret = bk.platform() != "gpu"
  cfg = _Config(feature_map, bool(normalize), float(eps),
                interpret_params() if interpret else False, int(chunk_blocks))
  return _linear_attention(query, key, value, cfg)
