"""LayerNorm and one-group GroupNorm with a hand-written backward, for every family.

``LayerNorm`` and ``GroupNorm`` are Flax's norms (same attributes,
parameters, names and initialisation, so checkpoints and converters are unaffected)
whose float32 forward and backward go through ``normalize``, a custom VJP. Autodiff of
Flax's norms leaves XLA:CPU several full-size passes that it does not fuse (the mean and
the inverse deviation broadcast back to the map and materialised, each consumer
reading them again); the closed-form gradient

    dx = rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)),   g' = g * scale

is two reductions and one elementwise pass. What it buys is small and only shows in
whole steps (one process, interleaved, batch 8, 2-core machine: ``python -m
vit_jax.tools.layers_ab --model=M --mode=train --swap=norms``): PoolFormer v2-S12's
train step 1.04-1.07x, ViT-Ti 1.02x, PVT v2-b0 1.00-1.07x, GC ViT-XXT 1.00x. One norm
alone (``--layers --swap=norms``), forward + backward: LayerNorm 1.15-1.39x, the
one-group GroupNorm 0.65x (XLA fuses that one well on its own; inside PoolFormer's step
it still gains).

The variance is taken as Flax's would be: in one pass with ``use_fast_variance`` (Flax's
default, ``mean(x^2) - mean^2``), else in two (``mean((x - mean)^2)``, as PyTorch; the
families set this where they follow PyTorch). Anything the fast path does not
cover falls back to Flax: other dtypes than float32, masks, cross-device statistics
(``axis_name``), LayerNorm over other axes than the last, GroupNorm with several groups.
"""

import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x: Array, scale: Optional[Array], bias: Optional[Array],
              axes: Sequence[int], epsilon: float, fast_variance: bool = False) -> Array:
  """``(x - mean) / sqrt(var + epsilon) * scale + bias``, statistics over ``axes``;
  ``scale`` and ``bias`` (either may be None) run along the last axis. The variance is
  ``mean((x - mean)^2)``, or with ``fast_variance`` ``max(mean(x^2) - mean^2, 0)`` (one
  pass, as Flax's ``use_fast_variance``)."""
  return _normalize_fwd(x, scale, bias, axes, epsilon, fast_variance)[0]


def _statistics(x: Array, axes: Sequence[int], epsilon: float, fast_variance: bool):
  mean = jnp.mean(x, axes, keepdims=True)
  if fast_variance:
    var = jnp.maximum(jnp.mean(x * x, axes, keepdims=True) - mean * mean, 0)
  else:
    centred = x - mean
    var = jnp.mean(centred * centred, axes, keepdims=True)
  return mean, jax.lax.rsqrt(var + epsilon)


def _normalize_fwd(x, scale, bias, axes, epsilon, fast_variance):
  mean, rstd = _statistics(x, axes, epsilon, fast_variance)
  y = (x - mean) * rstd
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y, (x, mean, rstd, scale, bias)


def _normalize_bwd(axes, epsilon, fast_variance, residuals, g):
  del epsilon, fast_variance
  x, mean, rstd, scale, bias = residuals
  x_hat = (x - mean) * rstd
  per_channel = tuple(range(x.ndim - 1))
  d_scale = None if scale is None else jnp.sum(g * x_hat, per_channel)
  d_bias = None if bias is None else jnp.sum(g, per_channel)
  if scale is not None and x.ndim - 1 in axes:
    # The means of g * scale and g * scale * x_hat over axes that include the channel
    # axis are products with scale (then sums over the other axes): XLA:CPU's fused
    # reduction otherwise takes scale and rstd written out at the activation's full
    # size (LayerNorm's forward + backward alone 1.3-1.8x faster at the zoo's shapes).
    count = math.prod(x.shape[a] for a in axes)
    others = tuple(a for a in axes if a != x.ndim - 1)
    channel_mean = lambda v: jnp.sum(v @ scale, others, keepdims=True)[..., None] / count
    dx = rstd * (g * scale - channel_mean(g) - x_hat * channel_mean(g * x_hat))
    return dx, d_scale, d_bias
  g = g if scale is None else g * scale
  dx = rstd * (g - jnp.mean(g, axes, keepdims=True)
               - x_hat * jnp.mean(g * x_hat, axes, keepdims=True))
  return dx, d_scale, d_bias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _float32(module: nn.Module, x: Array) -> bool:
  return (x.dtype == jnp.float32 and jnp.dtype(module.param_dtype) == jnp.float32
          and module.dtype in (None, jnp.float32))


def _params(module: nn.Module, features: int):
  scale = (module.param("scale", module.scale_init, (features,), module.param_dtype)
           if module.use_scale else None)
  bias = (module.param("bias", module.bias_init, (features,), module.param_dtype)
          if module.use_bias else None)
  return scale, bias


class LayerNorm(nn.LayerNorm):
  """``nn.LayerNorm`` whose float32 normalisation over the last axis runs ``normalize``."""

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None) -> Array:
    last = self.reduction_axes in (-1, (-1,), x.ndim - 1, (x.ndim - 1,))
    if (mask is not None or self.axis_name is not None or not last
        or self.feature_axes not in (-1, (-1,)) or not _float32(self, x)):
      return super().__call__(x, mask=mask)
    scale, bias = _params(self, x.shape[-1])
    return normalize(x, scale, bias, (x.ndim - 1,), self.epsilon, self.use_fast_variance)


class GroupNorm(nn.GroupNorm):
  """``nn.GroupNorm`` whose float32 one-group case (statistics over every axis but the
  batch, PoolFormer's and SHViT's norm) runs ``normalize``."""

  @nn.compact
  def __call__(self, x: Array, *, mask: Optional[Array] = None) -> Array:
    one_group = (self.num_groups == 1 and self.group_size is None) or (
        self.num_groups is None and self.group_size == x.shape[-1])
    if (mask is not None or self.axis_name is not None or not one_group
        or self.reduction_axes is not None or x.ndim < 2 or not _float32(self, x)):
      return super().__call__(x, mask=mask)
    scale, bias = _params(self, x.shape[-1])
    return normalize(x, scale, bias, tuple(range(1, x.ndim)), self.epsilon,
                     self.use_fast_variance)

