"""Resampling learned position tables to a new resolution, patch grid or window.

* ``resample_posemb``: an absolute position embedding ``[1, prefix + h*w, D]`` (the
  class token's slot kept as is) resized to a new ``h'xw'`` grid. Numerically the
  same as timm's ``resample_abs_pos_embed`` (``F.interpolate`` on the grid): with
  ``antialias=True`` (timm's default) through ``jax.image.resize``, whose
  antialiased cubic/triangle kernels are PyTorch's antialiased ones; without
  antialias through PyTorch's own separable weights (half-pixel centres, cubic
  coefficient -0.75, edge clamping), which is what timm's ``.npz`` loader uses
  (bilinear, no antialias).
* ``resize_rel_pos_bias_table``: a relative position bias table of a windowed model
  (Swin-style flat ``[(2w-1)*(2w-1), heads]`` or MaxViT-style ``[heads, 2w-1, 2w-1]``)
  resized for a new window, as timm's ``resize_rel_pos_bias_table_simple``
  (bicubic, no antialias).
* ``resize_patch_kernel``: a patch-embedding kernel ``[p, p, C, D]`` for another patch
  size, by FlexiViT's pseudo-inverse resize (PI-resize, Beyer et al. 2023): the new
  kernel ``w'`` minimises ``|<x, w> - <B x, w'>|`` over patches ``x``, where ``B`` is
  bilinear resizing (half-pixel centres, no antialias, as ``tf.image.resize``), i.e.
  ``w' = pinv(B^T) w``. Upsampling a patch together with the kernel then gives the
  same tokens. ``method="bilinear"`` resizes the kernel like an image instead (the
  baseline the paper compares with).
"""

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
METHODS = ("bilinear", "bicubic")


def _torch_resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """``[out, in]`` weights of PyTorch's non-antialiased 1-d interpolation.

  ``align_corners=False``: output pixel ``i`` samples the input at
  ``(i + 0.5) * in / out - 0.5``. Bilinear clamps negative positions to 0; bicubic
  uses Keys' kernel with ``a = -0.75`` and clamps the four taps to the border.
  """
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    if method == "bilinear":
      src = max(src, 0.0)
      i0 = min(int(math.floor(src)), in_size - 1)
      i1 = min(i0 + 1, in_size - 1)
      t = src - i0
      weights[i, i0] += 1.0 - t
      weights[i, i1] += t
    else:
      i0 = int(math.floor(src))
      t = src - i0
      a = -0.75
      cubic1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
      cubic2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
      coeffs = (cubic2(t + 1), cubic1(t), cubic1(1 - t), cubic2(2 - t))
      for k, c in zip(range(-1, 3), coeffs):
        weights[i, min(max(i0 + k, 0), in_size - 1)] += c
  return weights.astype(np.float32)


def resize_grid(grid: Array, new_size: Sequence[int], *, method: str = "bicubic",
                antialias: bool = True) -> Array:
  """Resizes ``[h, w, C]`` to ``[h', w', C]`` (float32 math, input dtype out)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  new_size = tuple(int(s) for s in new_size)
  dtype = grid.dtype
  grid = jnp.asarray(grid, jnp.float32)
  if tuple(grid.shape[:2]) == new_size:
    return grid.astype(dtype)
  if antialias:
    out = jax.image.resize(grid, new_size + grid.shape[2:], method=method, antialias=True)
  else:
    rows = _torch_resize_matrix(grid.shape[0], new_size[0], method)
    cols = _torch_resize_matrix(grid.shape[1], new_size[1], method)
    out = jnp.einsum("ih,jw,hwc->ijc", rows, cols, grid,
                     precision=jax.lax.Precision.HIGHEST)
  return out.astype(dtype)


def _square_side(n: int, what: str) -> int:
  side = int(round(math.sqrt(n)))
  if side * side != n:
    raise ValueError(f"{what}: {n} positions are not a square grid; pass old_size")
  return side


def resample_posemb(posemb: Array, new_size: Sequence[int], *,
                    old_size: Optional[Sequence[int]] = None, num_prefix_tokens: int = 1,
                    method: str = "bicubic", antialias: bool = True) -> Array:
  """``[1, prefix + h*w, D]`` -> ``[1, prefix + h'*w', D]``; prefix tokens unchanged.

  ``old_size`` defaults to a square grid. ``num_prefix_tokens`` is 1 for a ViT with
  a class token, 0 for ``classifier="gap"``/``"map"``.
  """
  posemb = jnp.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"expected a position embedding [1, tokens, dim], got {posemb.shape}")
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  if old_size is None:
    side = _square_side(grid.shape[0], "position embedding")
    old_size = (side, side)
  old_size = tuple(int(s) for s in old_size)
  if old_size[0] * old_size[1] != grid.shape[0]:
    raise ValueError(f"position embedding has {grid.shape[0]} grid tokens, not "
                     f"{old_size[0]}x{old_size[1]}")
  grid = resize_grid(grid.reshape(old_size + (-1,)), new_size, method=method,
                     antialias=antialias)
  return jnp.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


PATCH_KERNEL_METHODS = ("pi", "bilinear")


def _pi_resize_matrix(old_hw: Sequence[int], new_hw: Sequence[int]) -> np.ndarray:
  """``[new_h*new_w, old_h*old_w]`` matrix taking a flat old kernel to the new one."""
  # B maps a flat old patch to the flat bilinearly resized patch (row-major, as the
  # kernel's spatial axes flatten); PyTorch's and TF's non-antialiased bilinear
  # weights agree (half-pixel centres, borders clamped).
  resize = np.kron(_torch_resize_matrix(old_hw[0], new_hw[0], "bilinear"),
                   _torch_resize_matrix(old_hw[1], new_hw[1], "bilinear"))
  return np.linalg.pinv(resize.astype(np.float64).T).astype(np.float32)


def resize_patch_kernel(kernel: Array, new_hw: Sequence[int], *,
                        method: str = "pi") -> Array:
  """A ``[h, w, C, D]`` patch-embedding kernel resized to ``new_hw`` (see above).

  Traceable (the resize matrix is a constant of the shapes): models call it on
  their parameters in every forward pass, so gradients reach the stored kernel.
  """
  if method not in PATCH_KERNEL_METHODS:
    raise ValueError(f"patch kernel resize method must be one of {PATCH_KERNEL_METHODS}, "
                     f"got {method!r}")
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f"expected a patch-embedding kernel [h, w, in, out], got {kernel.shape}")
  new_hw = tuple(new_hw)
  if len(new_hw) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1
                                 for s in new_hw):
    raise ValueError(f"a patch kernel can be resized to positive integer sizes only, got "
                     f"{new_hw}")
  old_hw = tuple(kernel.shape[:2])
  if old_hw == new_hw:
    return kernel
  if method == "bilinear":
    flat = kernel.reshape(old_hw + (-1,))
    out = resize_grid(flat, new_hw, method="bilinear", antialias=False)
    return out.reshape(new_hw + kernel.shape[2:])
  matrix = _pi_resize_matrix(old_hw, new_hw)
  out = jnp.einsum("no,oc->nc", matrix,
                   kernel.reshape(old_hw[0] * old_hw[1], -1).astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(new_hw + kernel.shape[2:]).astype(kernel.dtype)


def resize_rel_pos_bias_table(table: Array, new_window: Sequence[int]) -> Array:
  """Relative position bias table for ``new_window`` (timm's bicubic, no antialias).

  ``table`` is flat ``[(2h-1)*(2w-1), heads]`` (Swin; the old window is assumed
  square) or ``[heads, 2h-1, 2w-1]`` (MaxViT-style).
  """
  table = jnp.asarray(table)
  dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
  if table.ndim == 3:
    out = resize_grid(jnp.transpose(table, (1, 2, 0)), dst, method="bicubic",
                      antialias=False)
    return jnp.transpose(out, (2, 0, 1))
  if table.ndim != 2:
    raise ValueError(f"expected a [positions, heads] or [heads, h, w] table, got "
                     f"{table.shape}")
  side = _square_side(table.shape[0], "relative position bias table")
  out = resize_grid(table.reshape(side, side, -1), dst, method="bicubic",
                    antialias=False)
  return out.reshape(dst[0] * dst[1], -1)
