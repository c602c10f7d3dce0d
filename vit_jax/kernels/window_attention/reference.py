"""Windowed softmax attention over an NHWC feature map: the specification.

Two ways to cut an ``H x W`` map into windows of ``P = ph * pw`` positions:

- ``mode="block"``: non-overlapping ``ph x pw`` tiles (Swin windows, MaxViT block
  attention). Window ``(i, j)`` holds rows ``i*ph .. i*ph+ph-1`` and columns
  ``j*pw .. j*pw+pw-1``.
- ``mode="grid"``: a dilated ``ph x pw`` grid (MaxViT grid attention). Window ``(i, j)``
  holds rows ``i, i + H/ph, i + 2H/ph, ...`` and columns ``j, j + W/pw, ...``; there
  are ``(H/ph) x (W/pw)`` windows, each spanning the whole map.

Inside a window, position ``p = a * pw + b`` (row-major over the window) attends to
every position of the same window. Windows are numbered row-major too. Any fused
implementation must match this function in forward and gradient.
"""

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(shape, window, mode):
  _, height, width, _, _ = shape
  ph, pw = window
  if mode not in ("block", "grid"):
    raise ValueError(f"mode must be 'block' or 'grid', got {mode!r}")
  if height % ph or width % pw:
    raise ValueError(f"a {height}x{width} map cannot be cut into {ph}x{pw} {mode} windows: "
                     "pad the map to a multiple of the window first")


def partition(x: Array, window: tuple[int, int], mode: str = "block") -> Array:
  """``[B, H, W, ...] -> [B, num_windows, ph * pw, ...]``."""
  b, h, w = x.shape[:3]
  rest = x.shape[3:]
  ph, pw = window
  if mode == "block":
    x = x.reshape((b, h // ph, ph, w // pw, pw) + rest)
    x = jnp.moveaxis(x, 2, 3)  # [B, h/ph, w/pw, ph, pw, ...]
  else:
    x = x.reshape((b, ph, h // ph, pw, w // pw) + rest)
    x = jnp.transpose(x, (0, 2, 4, 1, 3) + tuple(range(5, x.ndim)))
  return x.reshape((b, (h // ph) * (w // pw), ph * pw) + rest)


def unpartition(x: Array, window: tuple[int, int], size: tuple[int, int],
                mode: str = "block") -> Array:
  """Inverse of ``partition``: ``[B, num_windows, ph * pw, ...] -> [B, H, W, ...]``."""
  b = x.shape[0]
  rest = x.shape[3:]
  (ph, pw), (h, w) = window, size
  x = x.reshape((b, h // ph, w // pw, ph, pw) + rest)
  if mode == "block":
    x = jnp.moveaxis(x, 3, 2)  # [B, h/ph, ph, w/pw, pw, ...]
  else:
    x = jnp.transpose(x, (0, 3, 1, 4, 2) + tuple(range(5, x.ndim)))
  return x.reshape((b, h, w) + rest)


def window_attention_reference(query: Array, key: Array, value: Array, *,
                               window: tuple[int, int], mode: str = "block",
                               bias: Optional[Array] = None,
                               mask: Optional[Array] = None) -> Array:
  """Softmax attention inside each window.

  Args:
    query, key, value: ``[B, H, W, heads, head_dim]``.
    window: ``(ph, pw)``, the window (block) or grid size.
    bias: additive logits ``[heads, P, P]`` shared by all windows (relative
      position bias), ``P = ph * pw``.
    mask: additive logits ``[num_windows, P, P]`` per window (Swin's shifted-window
      mask: 0 where allowed, a large negative number elsewhere).

  Returns:
    ``[B, H, W, heads, head_dim]``, in the layout of ``query``.
  """
  _check(query.shape, window, mode)
  size = query.shape[1:3]
  q, k, v = (partition(t, window, mode) for t in (query, key, value))  # [B, n, P, h, d]
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bnqhd,bnkhd->bnhqk", q * scale, k)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)[None, None]
  if mask is not None:
    logits = logits + mask.astype(logits.dtype)[None, :, None]
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  out = jnp.einsum("bnhqk,bnkhd->bnqhd", weights, v)
  return unpartition(out, window, size, mode)
