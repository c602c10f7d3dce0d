"""Block/grid window attention in Pallas, read straight from the NHWC layout.

A ``[B, H, W, heads, head_dim]`` map is viewed (a free, row-major reshape, never a
copy) as ``[B, H/ph, ph, W/pw, pw, heads, head_dim]`` for block windows or
``[B, ph, H/ph, pw, W/pw, heads, head_dim]`` for grid windows. In both views window
``(i, j)`` is one BlockSpec block: ``(ph, pw)`` positions picked by the index map
``(b, i, 0, j, 0, ...)`` or ``(b, 0, i, 0, j, ...)``. So the kernel DMAs/loads the
window's positions directly from the feature map, and writes its output the same
way: no partitioned ``[B, windows, P, ...]`` copy is ever written to memory (XLA's
reference path writes three of them for q/k/v, plus the un-partition of the output).

Per window the whole ``P x P`` softmax fits in registers/VMEM (P = 49 for 7x7), so
the forward pass is one shot, and the backward pass recomputes the probabilities
and produces dq, dk, dv and, when a bias or mask is given, the logits' gradient
summed over the batch chunk (XLA sums the chunks: ``dbias = sum over windows``,
``dmask = sum over heads``).

Backends (see ``_backend``):

- GPU (Triton): one program per (batch chunk, window, head). Triton values must
  have a power-of-two size, and 49 is not one: the kernel gathers the window's
  positions with integer index arrays padded to ``Pp = next_pow2(P)`` (>= 16).
  Padded positions alias the window's last position, so every duplicate address
  is written with an identical value (no race): padded query rows compute exactly
  row ``P-1``; padded key columns are masked out of the softmax and, for dk/dv,
  take column ``P-1``'s weights (padded query rows are left out of those sums).
  Head dims are padded to a power of two.
- TPU (Mosaic): one program per (batch chunk, window) with every head in the block,
  because a block's last two dims must be whole or (8, 128)-aligned and
  ``(heads, head_dim)`` are whole; the kernel loops over heads.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vit_jax.kernels import _backend as bk
from vit_jax.kernels.window_attention import reference

Array = jax.Array
f32 = jnp.float32
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Programs to aim for when the backward pass folds the batch to sum the logits'
# gradient (GPU), and bytes of one q/k/v block on TPU.
GPU_TARGET_PROGRAMS = 1024
TPU_BLOCK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static description of a call: shapes, window cut and backend."""
  backend: str
  interpret: bool
  mode: str
  batch: int
  height: int
  width: int
  heads: int
  head_dim: int
  ph: int
  pw: int
  has_bias: bool
  has_mask: bool

  @property
  def p(self) -> int:
    return self.ph * self.pw

  @property
  def pp(self) -> int:
    """Positions per window as the kernel holds them (GPU: power of two >= 16)."""
    if self.backend == "triton":
      return max(bk.TRITON_MIN_DIM, bk.next_pow2(self.p))
    return self.p

  @property
  def dp(self) -> int:
    return bk.padded_head_dim(self.head_dim, self.backend)

  @property
  def windows(self) -> tuple[int, int]:
    return self.height // self.ph, self.width // self.pw


# ----------------------------------------------------------------------------
# Views and block specs
# ----------------------------------------------------------------------------

def _view(x: Array, g: _Geometry) -> Array:
  b, h, w, n, d = x.shape
  nh, nw = g.windows
  if g.mode == "block":
    return x.reshape(b, nh, g.ph, nw, g.pw, n, d)
  return x.reshape(b, g.ph, nh, g.pw, nw, n, d)


def _map_spec(g: _Geometry, bb: int):
  """q/k/v/o blocks: ``bb`` images x one window x (GPU: one head | TPU: all heads)."""
  if g.mode == "block":
    dims = (bb, None, g.ph, None, g.pw)
    pos = lambda i, j: (i, 0, j, 0)
  else:
    dims = (bb, g.ph, None, g.pw, None)
    pos = lambda i, j: (0, i, 0, j)
  if g.backend == "triton":
    return pl.BlockSpec(dims + (None, g.dp), lambda c, i, j, h: (c,) + pos(i, j) + (h, 0))
  return pl.BlockSpec(dims + (g.heads, g.dp), lambda c, i, j: (c,) + pos(i, j) + (0, 0))


def _bias_spec(g: _Geometry):
  if g.backend == "triton":
    return pl.BlockSpec((None, g.pp, g.pp), lambda c, i, j, h: (h, 0, 0))
  return pl.BlockSpec((g.heads, g.pp, g.pp), lambda c, i, j: (0, 0, 0))


def _mask_spec(g: _Geometry):
  nw = g.windows[1]
  if g.backend == "triton":
    return pl.BlockSpec((None, g.pp, g.pp), lambda c, i, j, h: (i * nw + j, 0, 0))
  return pl.BlockSpec((None, g.pp, g.pp), lambda c, i, j: (i * nw + j, 0, 0))


def _dlogits_spec(g: _Geometry):
  nw = g.windows[1]
  if g.backend == "triton":
    return pl.BlockSpec((None, None, None, g.pp, g.pp),
                        lambda c, i, j, h: (c, i * nw + j, h, 0, 0))
  return pl.BlockSpec((None, None, g.heads, g.pp, g.pp),
                      lambda c, i, j: (c, i * nw + j, 0, 0, 0))


def _grid(g: _Geometry, bb: int) -> tuple[int, ...]:
  nh, nw = g.windows
  base = (g.batch // bb, nh, nw)
  return base + (g.heads,) if g.backend == "triton" else base


# ----------------------------------------------------------------------------
# Window tiles: how a kernel reads/writes one (image, head) window as [Pp, dp].
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tile:
  g: _Geometry

  def _gather_index(self):
    g = self.g
    pos = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (g.pp, g.dp), 0), g.p - 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (g.pp, g.dp), 1)
    return pos // g.pw, pos % g.pw, cols

  def load(self, ref, b, h) -> Array:
    g = self.g
    if g.backend == "triton":  # padded positions alias position P-1
      rows, cols, feats = self._gather_index()
      return ref[b, rows, cols, feats]
    return ref[b, :, :, h, :].reshape(g.p, g.dp)

  def store(self, ref, b, h, value) -> None:
    g = self.g
    value = value.astype(ref.dtype)
    if g.backend == "triton":
      rows, cols, feats = self._gather_index()
      ref[b, rows, cols, feats] = value
    else:
      ref[b, :, :, h, :] = value.reshape(g.ph, g.pw, g.dp)


def _extra_logits(g: _Geometry, bias_ref, mask_ref, h) -> Optional[Array]:
  extra = None
  if bias_ref is not None:
    extra = (bias_ref[...] if g.backend == "triton" else bias_ref[h]).astype(f32)
  if mask_ref is not None:
    mask = mask_ref[...].astype(f32)
    extra = mask if extra is None else extra + mask
  return extra


def _probabilities(g: _Geometry, q, k, extra, scale) -> Array:
  s = bk.dot(q, k, trans_b=True) * scale
  if extra is not None:
    s = s + extra
  if g.pp != g.p:  # padded key columns
    cols = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(cols < g.p, s, MASK_VALUE)
  s = s - jnp.max(s, axis=1, keepdims=True)
  e = jnp.exp(s)
  return e / jnp.sum(e, axis=1, keepdims=True)


def _for_key_grads(g: _Geometry, x: Array) -> Array:
  """Prepares ``[queries, keys]`` weights for sums over queries (dk, dv).

  Padded query rows duplicate row P-1 and must not be counted again; padded key
  columns alias key P-1, whose address they share, and take its column so that
  every write to that address carries the same value.
  """
  if g.pp == g.p:
    return x
  rows = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  x = jnp.where(rows < g.p, x, 0.0)
  last = jnp.sum(jnp.where(cols == g.p - 1, x, 0.0), axis=1, keepdims=True)
  return jnp.where(cols < g.p, x, last)


def _split_refs(refs, g: _Geometry, n_in: int):
  inputs = list(refs[:n_in])
  bias_ref = inputs.pop(n_in - 1 - int(g.has_mask)) if g.has_bias else None
  mask_ref = inputs.pop() if g.has_mask else None
  return inputs, bias_ref, mask_ref, list(refs[n_in:])


def _heads_per_program(g: _Geometry) -> int:
  return 1 if g.backend == "triton" else g.heads


def _cdt(dtype):
  return f32 if jnp.dtype(dtype) == jnp.float32 else dtype


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

def _fwd_kernel(*refs, g: _Geometry, bb: int):
  n_in = 3 + int(g.has_bias) + int(g.has_mask)
  (q_ref, k_ref, v_ref), bias_ref, mask_ref, (o_ref,) = _split_refs(refs, g, n_in)
  tile, scale, cdt = _Tile(g), g.head_dim ** -0.5, _cdt(q_ref.dtype)

  def per_image(b, carry):
    for h in range(_heads_per_program(g)):
      q, k, v = (tile.load(r, b, h).astype(cdt) for r in (q_ref, k_ref, v_ref))
      p = _probabilities(g, q, k, _extra_logits(g, bias_ref, mask_ref, h), scale)
      tile.store(o_ref, b, h, bk.dot(p.astype(cdt), v))
    return carry

  jax.lax.fori_loop(0, bb, per_image, 0)


def _bwd_kernel(*refs, g: _Geometry, bb: int):
  n_in = 4 + int(g.has_bias) + int(g.has_mask)
  (q_ref, k_ref, v_ref, do_ref), bias_ref, mask_ref, outs = _split_refs(refs, g, n_in)
  dq_ref, dk_ref, dv_ref = outs[:3]
  dl_ref = outs[3] if len(outs) > 3 else None
  tile, scale, cdt = _Tile(g), g.head_dim ** -0.5, _cdt(q_ref.dtype)
  heads = _heads_per_program(g)

  def per_image(b, dlogits):
    dlogits = list(dlogits)
    for h in range(heads):
      q, k, v, do = (tile.load(r, b, h).astype(cdt)
                     for r in (q_ref, k_ref, v_ref, do_ref))
      p = _probabilities(g, q, k, _extra_logits(g, bias_ref, mask_ref, h), scale)
      o = bk.dot(p.astype(cdt), v)
      dp = bk.dot(do, v, trans_b=True)
      delta = jnp.sum(do.astype(f32) * o, axis=1, keepdims=True)
      ds = p * (dp - delta)  # gradient of the logits
      tile.store(dq_ref, b, h, bk.dot(ds.astype(cdt), k) * scale)
      ds_keys = _for_key_grads(g, ds)
      tile.store(dk_ref, b, h, bk.dot(ds_keys.astype(cdt), q, trans_a=True) * scale)
      p_keys = _for_key_grads(g, p)
      tile.store(dv_ref, b, h, bk.dot(p_keys.astype(cdt), do, trans_a=True))
      if dl_ref is not None:
        dlogits[h] = dlogits[h] + ds
    return tuple(dlogits)

  init = tuple(jnp.zeros((g.pp, g.pp), f32) for _ in range(heads if dl_ref is not None
                                                            else 0))
  dlogits = jax.lax.fori_loop(0, bb, per_image, init)
  if dl_ref is not None:
    if g.backend == "triton":
      dl_ref[...] = dlogits[0]
    else:
      for h in range(heads):
        dl_ref[h] = dlogits[h]


# ----------------------------------------------------------------------------
# Wrapper with custom_vjp
# ----------------------------------------------------------------------------

def _largest_divisor_at_most(n: int, limit: int) -> int:
  limit = max(1, min(n, limit))
  return max(d for d in range(1, limit + 1) if n % d == 0)


def _batch_block(g: _Geometry, backward: bool) -> int:
  """Images per program: GPU folds the batch only when summing dlogits."""
  nh, nw = g.windows
  if g.backend == "triton":
    if not (backward and (g.has_bias or g.has_mask)):
      return 1
    wanted = g.batch * nh * nw * g.heads // GPU_TARGET_PROGRAMS
    return _largest_divisor_at_most(g.batch, wanted)
  per_image = g.p * g.heads * g.dp * 4
  return _largest_divisor_at_most(g.batch, TPU_BLOCK_BYTES // per_image)


def _pad_table(x: Optional[Array], g: _Geometry) -> Optional[Array]:
  """bias [heads, P, P] / mask [nW, P, P] -> [.., Pp, Pp]; padded rows repeat row P-1."""
  if x is None or g.pp == g.p:
    return x
  extra = g.pp - g.p
  return jnp.pad(x, ((0, 0), (0, extra), (0, extra)), mode="edge")


def _to_view(x: Array, g: _Geometry) -> Array:
  return _view(bk.pad_axis(x, 4, g.dp), g)


def _from_view(x: Array, g: _Geometry) -> Array:
  return x.reshape(g.batch, g.height, g.width, g.heads, g.dp)[..., :g.head_dim]


def _forward(q, k, v, bias, mask, g: _Geometry):
  bb = _batch_block(g, backward=False)
  spec = _map_spec(g, bb)
  in_specs = [spec] * 3
  args = [_to_view(x, g) for x in (q, k, v)]
  if g.has_bias:
    in_specs.append(_bias_spec(g))
    args.append(_pad_table(bias, g))
  if g.has_mask:
    in_specs.append(_mask_spec(g))
    args.append(_pad_table(mask, g))
  grid = _grid(g, bb)
  windows = g.batch * g.windows[0] * g.windows[1] * g.heads
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, g=g, bb=bb),
      grid=grid,
      in_specs=in_specs,
      out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(args[0].shape, q.dtype),
      compiler_params=bk.compiler_params(g.backend, g.interpret, len(grid)),
      cost_estimate=bk.cost_estimate(4 * windows * g.pp * g.pp * g.dp,
                                     windows * g.pp * g.pp,
                                     4 * q.size * q.dtype.itemsize),
      interpret=g.interpret,
      name=f"window_attention_{g.mode}_fwd",
  )(*args)
  return _from_view(out, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _window_attention(q, k, v, bias, mask, g):
  return _forward(q, k, v, bias, mask, g)


def _fwd(q, k, v, bias, mask, g):
  return _forward(q, k, v, bias, mask, g), (q, k, v, bias, mask)


def _bwd(g: _Geometry, residuals, d_out):
  q, k, v, bias, mask = residuals
  bb = _batch_block(g, backward=True)
  spec = _map_spec(g, bb)
  in_specs = [spec] * 4
  args = [_to_view(x, g) for x in (q, k, v, d_out.astype(q.dtype))]
  if g.has_bias:
    in_specs.append(_bias_spec(g))
    args.append(_pad_table(bias, g))
  if g.has_mask:
    in_specs.append(_mask_spec(g))
    args.append(_pad_table(mask, g))
  out_specs = [spec] * 3
  out_shape = [jax.ShapeDtypeStruct(args[0].shape, x.dtype) for x in (q, k, v)]
  nh, nw = g.windows
  want_dlogits = g.has_bias or g.has_mask
  if want_dlogits:
    out_specs.append(_dlogits_spec(g))
    out_shape.append(jax.ShapeDtypeStruct((g.batch // bb, nh * nw, g.heads, g.pp, g.pp),
                                          f32))
  grid = _grid(g, bb)
  windows = g.batch * nh * nw * g.heads
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, g=g, bb=bb),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=bk.compiler_params(g.backend, g.interpret, len(grid)),
      cost_estimate=bk.cost_estimate(10 * windows * g.pp * g.pp * g.dp,
                                     windows * g.pp * g.pp,
                                     7 * q.size * q.dtype.itemsize),
      interpret=g.interpret,
      name=f"window_attention_{g.mode}_bwd",
  )(*args)
  dq, dk, dv = (_from_view(x, g) for x in outs[:3])
  dbias = dmask = None
  if want_dlogits:
    dlogits = jnp.sum(outs[3], axis=0)[:, :, :g.p, :g.p]  # [nW, heads, P, P]
    if g.has_bias:
      dbias = jnp.sum(dlogits, axis=0).astype(bias.dtype)
    if g.has_mask:
      dmask = jnp.sum(dlogits, axis=1).astype(mask.dtype)
  return dq, dk, dv, dbias, dmask


_window_attention.defvjp(_fwd, _bwd)


def window_attention(query: Array, key: Array, value: Array, *,
                     window: tuple[int, int], mode: str = "block",
                     bias: Optional[Array] = None, mask: Optional[Array] = None,
                     backend: Optional[str] = None,
                     interpret: Optional[bool] = None) -> Array:
  """Pallas version of ``window_attention_reference`` (same arguments and result)."""
  reference._check(query.shape, window, mode)  # pylint: disable=protected-access
  if not (query.shape == key.shape == value.shape) or query.ndim != 5:
    raise ValueError("window attention takes query, key and value of one shape "
                     f"[B, H, W, heads, head_dim]; got {query.shape}, {key.shape}, "
                     f"{value.shape}")
  backend, interpret = bk.resolve(backend, interpret)
  b, h, w, heads, d = query.shape
  ph, pw = window
  p = ph * pw
  if bias is not None and bias.shape != (heads, p, p):
    raise ValueError(f"bias must be [heads, P, P] = {(heads, p, p)}, got {bias.shape}")
  num_windows = (h // ph) * (w // pw)
  if mask is not None and mask.shape != (num_windows, p, p):
    raise ValueError(f"mask must be [windows, P, P] = {(num_windows, p, p)}, "
                     f"got {mask.shape}")
  g = _Geometry(backend, interpret, mode, b, h, w, heads, d, ph, pw,
                bias is not None, mask is not None)
  return _window_attention(query, key, value, bias, mask, g)
