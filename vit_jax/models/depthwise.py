"""The depthwise convolution every family shares (re-exported by ``models.layers``).

A depthwise convolution (``feature_group_count == channels``) is cheap: ``k*k`` multiply-
adds per output element. XLA:CPU does not see that: it runs the forward of
``lax.conv_general_dilated(..., feature_group_count=C)`` one group at a time and lowers
its weight gradient as a convolution dense over channels (``C`` times the FLOPs), which
made the conv-hybrid families 0.1-0.8x of timm eager on CPU (issue 25). Measured on
this 2-core machine (8x28x28x128, 3x3, loaded): forward 203 ms -> 1.1 ms, weight
gradient 350 ms -> 16 ms, input gradient 205 ms -> 3 ms.

``impl="shift"`` computes it as what it is: the sum over the kernel taps of a
(strided, dilated) slice of the padded input times that tap's per-channel weights,
with a custom VJP whose weight gradient is a per-channel reduction per tap (over
batch and space of the slice times the output gradient; all taps in one variadic reduce) and whose input gradient is
the same tap sum over the padded output gradient with the kernel flipped (stride 1) or
the sum over taps of the gradient times the tap's weights, padded back into place
(strided). The 1x1 convolutions beside them run as matrix products (``layers.Conv``).
``optimization_barrier`` keeps XLA from fusing a producer into each of the ``k*k``
consumers (measured: without it the output gradient's producer was recomputed per
tap, 5x slower). Low-precision inputs accumulate in float32.

``impl="xla"`` is ``lax.conv_general_dilated`` with ``feature_group_count`` (cuDNN on
GPU, the TPU convolution units). ``"auto"`` picks ``"shift"`` on CPU and ``"xla"``
elsewhere: the GPU/TPU choice keeps the previous behaviour and has not been measured
against ``"shift"`` on those backends.

Parameters keep ``flax.linen.Conv``'s names and layout (``kernel``
``[*kernel_size, 1, channels]``, ``bias`` ``[channels]``) and initialisation, so
checkpoints and converters are unaffected.
"""

import functools
import itertools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
IMPLS = ("auto", "shift", "xla")


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f"depthwise conv: {name}={value} needs {n} entries (one per "
                     "spatial dimension)")
  return value


def resolve_padding(padding: Padding, spatial: Sequence[int], kernel: Sequence[int],
                    strides: Sequence[int], dilation: Sequence[int]
                    ) -> tuple[tuple[int, int], ...]:
  """Explicit ``(low, high)`` pads per spatial dimension, as ``nn.Conv`` reads them."""
  n = len(spatial)
  if isinstance(padding, str):
    if padding.upper() == "CAUSAL":
      if n != 1:
        raise ValueError("depthwise conv: padding='CAUSAL' is for 1-D convolutions")
      return (((kernel[0] - 1) * dilation[0], 0),)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    return tuple(tuple(p) for p in lax.padtype_to_pads(spatial, effective, strides,
                                                       padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * n
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != n:
    raise ValueError(f"depthwise conv: padding={padding} needs {n} entries")
  return pads


def _taps(kernel_shape):
  return itertools.product(*map(range, kernel_shape))


def _tap_slice(xp: Array, tap, strides, dilation, out_shape) -> Array:
  """The input slice that tap ``tap`` multiplies, for every output position."""
  start = [t * d for t, d in zip(tap, dilation)]
  limit = [a + s * (o - 1) + 1 for a, s, o in zip(start, strides, out_shape)]
  return lax.slice(xp, (0, *start, 0), (xp.shape[0], *limit, xp.shape[-1]),
                   (1, *strides, 1))


def _compute_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _pad(x: Array, pads) -> Array:
  return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def _out_shape(padded_spatial, kernel_shape, strides, dilation):
  return tuple((p - d * (k - 1) - 1) // s + 1
               for p, k, s, d in zip(padded_spatial, kernel_shape, strides, dilation))


def _tap_sum(xp, w, strides, dilation):
  """The convolution of the already padded ``xp``: the sum over taps of slice x weight."""
  ct = _compute_dtype(xp.dtype)
  kernel_shape = w.shape[:-1]
  out_shape = _out_shape(xp.shape[1:-1], kernel_shape, strides, dilation)
  y = None
  for tap in _taps(kernel_shape):
    term = (_tap_slice(xp, tap, strides, dilation, out_shape).astype(ct)
            * w[tap].astype(ct))
    y = term if y is None else y + term
  return y


def _shift_forward(x, w, strides, pads, dilation):
  xp = lax.optimization_barrier(_pad(x, pads))
  return lax.optimization_barrier(_tap_sum(xp, w, strides, dilation).astype(x.dtype)), xp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shift_conv(x, w, strides, pads, dilation):
  return _shift_forward(x, w, strides, pads, dilation)[0]


def _shift_conv_fwd(x, w, strides, pads, dilation):
  # The backward reads the padded input: keeping it rather than x means x itself (often
  # a bias add or norm feeding only this conv) is never written out (PVT v2's MLP: one
  # 8x56x56x256 pass less per block, forward and backward).
  y, xp = _shift_forward(x, w, strides, pads, dilation)
  return y, (xp, w)


_SMALL_MAP = 28 * 28  # output positions; see the weight gradient below


def _shift_conv_bwd(strides, pads, dilation, residuals, g):
  xp, w = residuals
  ct = _compute_dtype(g.dtype)
  xp, g = lax.optimization_barrier((xp, g))
  x_shape = (xp.shape[0], *(n - lo - hi for n, (lo, hi) in zip(xp.shape[1:-1], pads)),
             xp.shape[-1])
  kernel_shape = w.shape[:-1]
  out_shape = g.shape[1:-1]
  gc = g.astype(ct)
  # The weight gradient, per channel (no dense conv): one variadic reduction with every
  # tap an operand, so that g and x are read in one pass, over the batch (up to 9 taps)
  # or the batch and all spatial axes but the last (more taps: fewer partial sums to
  # keep); then the sum over the axes left. Against a reduction per tap, measured at
  # batch 8: 56x56x128 7x7 4.6x, 14x14x384 5x5 ~4x, 56x56x512 3x3 2.5x, 112x112x256 3x3
  # 1.7x; reducing 7x7 over the batch alone was 4x slower, 3x3 over batch and rows 1.5-3x.
  # Maps up to 28x28 with more taps (ConvFormer's 7x7 in stages 2-4) reduce over the
  # batch, one kernel row of taps per reduction: there XLA:CPU's time follows the number
  # of taps x partial sums, not the work (batch 8, 7x7: 7x7x1024 32.5 -> 4.9 ms, 14x14x640
  # 12.2 -> 4.8, 28x28x256 35 -> 29; 56x56x128 would be 38 -> 47, so it stays).
  products = tuple(_tap_slice(xp, tap, strides, dilation, out_shape).astype(ct) * gc
                   for tap in _taps(kernel_shape))
  few = len(products) <= 9
  by_row = not few and math.prod(out_shape) <= _SMALL_MAP
  first = (0,) if few or by_row else tuple(range(g.ndim - 2))
  size = kernel_shape[-1] if by_row else len(products)
  partial = []
  for start in range(0, len(products), size):
    group = products[start:start + size]
    partial += lax.reduce(group, tuple(jnp.zeros((), ct) for _ in group),
                          lambda a, b: tuple(u + v for u, v in zip(a, b)), first)
  dw = [jnp.sum(p, axis=tuple(range(p.ndim - 1))) for p in partial]
  if all(s == 1 for s in strides):
    # The input gradient is the convolution of g, padded, with the kernel flipped: each
    # element gathers its taps and is written once (measured 1.2x faster at 7x7 and 5x5
    # than scattering each tap's g * w back into place; 0.75x at stride 2, so strided
    # convolutions keep the scatter).
    config = [(0, 0, 0)]
    for k, d, n, o, (lo, _) in zip(kernel_shape, dilation, x_shape[1:-1], out_shape, pads):
      left = (k - 1) * d - lo
      config.append((left, n + (k - 1) * d - left - o, 0))
    config.append((0, 0, 0))
    gp = lax.pad(gc, jnp.zeros((), ct), config)
    flipped = w[tuple(slice(None, None, -1) for _ in kernel_shape)]
    dx = _tap_sum(gp, flipped, strides, dilation).astype(xp.dtype)
  else:
    dxp = None
    for tap in _taps(kernel_shape):
      # Scatter g * w[tap] back to the positions this tap read (interior pad = stride).
      config = [(0, 0, 0)]
      for t, d, s, o, size in zip(tap, dilation, strides, out_shape, xp.shape[1:-1]):
        config.append((t * d, size - t * d - s * (o - 1) - 1, s - 1))
      config.append((0, 0, 0))
      term = lax.pad(gc * w[tap].astype(ct), jnp.zeros((), ct), config)
      dxp = term if dxp is None else dxp + term
    index = (slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(pads, x_shape[1:-1])),
             slice(None))
    dx = dxp[index].astype(xp.dtype)
  dw = jnp.stack(dw).reshape(w.shape).astype(w.dtype)
  return lax.optimization_barrier((dx, dw))


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def _xla_conv(x, w, strides, pads, dilation):
  n = x.ndim - 2
  spatial = "DHW"[-n:]
  dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  return lax.conv_general_dilated(x, w[..., None, :], strides, pads,
                                  rhs_dilation=dilation, dimension_numbers=dims,
                                  feature_group_count=x.shape[-1])


def depthwise_conv(x: Array, kernel: Array, *, strides: Union[int, Sequence[int]] = 1,
                   padding: Padding = "SAME", dilation: Union[int, Sequence[int]] = 1,
                   impl: str = "auto") -> Array:
  """Depthwise convolution of channels-last ``x`` ``[batch, *spatial, C]``.

  ``kernel``: ``[*kernel_size, C]`` or ``nn.Conv``'s ``[*kernel_size, 1, C]``.
  ``padding``: ``"SAME"``, ``"VALID"``, ``"CAUSAL"`` (1-D), an int, or per-dimension
  ints / ``(low, high)`` pairs, as ``nn.Conv`` reads them. Returns
  ``[batch, *out_spatial, C]`` in ``x``'s dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"depthwise conv: impl must be one of {IMPLS}, got {impl!r}")
  n = x.ndim - 2
  if n < 1 or n > 3:
    raise ValueError(f"depthwise conv: x must be [batch, *spatial, channels] with 1-3 "
                     f"spatial dims, got shape {x.shape}")
  if kernel.ndim == n + 2:
    if kernel.shape[-2] != 1:
      raise ValueError(f"depthwise conv: kernel {kernel.shape} has "
                       f"{kernel.shape[-2]} input features per group; depthwise needs 1")
    kernel = kernel[..., 0, :]
  if kernel.ndim != n + 1 or kernel.shape[-1] != x.shape[-1]:
    raise ValueError(f"depthwise conv: kernel {kernel.shape} does not match input "
                     f"{x.shape} (expected [*kernel_size, {x.shape[-1]}])")
  strides = _tuple(strides, n, "strides")
  dilation = _tuple(dilation, n, "dilation")
  pads = resolve_padding(padding, x.shape[1:-1], kernel.shape[:-1], strides, dilation)
  if impl == "auto":
    impl = "shift" if jax.default_backend() == "cpu" else "xla"
  if impl == "xla":
    return _xla_conv(x, kernel, strides, pads, dilation)
  return _shift_conv(x, kernel, strides, pads, dilation)


class DepthwiseConv(nn.Module):
  """``nn.Conv(features, kernel_size, feature_group_count=features)`` through
  ``depthwise_conv``: same fields, parameter names, shapes and initialisation.

  The input must have ``features`` channels (no depth multiplier: no family uses one).
  """
  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: Padding = "SAME"
  kernel_dilation: Union[int, Sequence[int]] = 1
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()  # nn.Conv's default
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.shape[-1] != self.features:
      raise ValueError(f"DepthwiseConv {self.name}: input has {x.shape[-1]} channels, "
                       f"features={self.features} (a depthwise conv keeps the width)")
    kernel_size = tuple(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init, kernel_size + (1, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = depthwise_conv(x, kernel, strides=self.strides, padding=self.padding,
                       dilation=self.kernel_dilation, impl=self.impl)
    return y if bias is None else y + bias
