"""Outlier-robust attention and integer-only ops, as settings of the ViT blocks.

Two remedies from "Quantizable Transformers" (Bondarenko et al., NeurIPS 2023) for
the activation outliers that make int8 quantization of transformers fail (heads that
learn to do nothing push their softmax towards exact zeros, which needs huge logits):

* **clipped softmax** ``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` with
  ``zeta >= 1``, ``gamma <= 0``: a weight reaches exactly 0 (or 1) at a finite logit,
  and the clip stops the gradient there (``clipped_softmax``);
* **gated attention**: each head's output times ``sigmoid(Linear(token))``, one gate
  per token and head (``layers.MultiHeadDotProductAttention(gate=True)``; the paper's
  "Linear" gate, here read from the whole token).

And I-ViT's integer-only approximations (Li & Gu, ICCV 2023), which compute with
int32 additions, bit shifts and one integer division per row:

* **Shiftmax** (``shiftmax``): ``exp`` by Shift-Exp — ``x log2(e)`` as
  ``x + (x >> 1) - (x >> 4)``, split into ``-q + r`` with integer ``q`` and
  ``r`` in ``(-1, 0]``, ``2**r ~ 1 + r / 2`` and ``2**-q`` a shift — then an integer
  division (IntDiv) to ``out_bits`` (8: weights in steps of 1/128).
* **ShiftGELU** (``shift_gelu``): ``GELU(x) ~ x * sigmoid(1.702 x)`` with
  ``1.702 x ~ x + (x >> 1) + (x >> 3) + (x >> 4)`` and the sigmoid from Shift-Exp and
  IntDiv. The paper subtracts the row maximum before Shift-Exp; here each element
  takes ``exp(-|z|)`` instead (``sigmoid(z) = 1 / (1 + exp(-z))`` for ``z >= 0``), the
  same ops, because a row maximum far above an element underflows both terms of its
  sigmoid to zero.
* **I-LayerNorm** (``ILayerNorm``): integer mean and variance of the int8 token
  and the standard deviation by I-ViT's integer square root (Newton's iteration
  ``s <- (s + n // s) >> 1`` from ``2 ** ceil(bits(n) / 2)``); the per-channel scale and
  bias (parameters ``scale``/``bias``, as ``nn.LayerNorm``) are applied in float, where
  I-ViT folds them into its dyadic requantization.

The integer ops simulate the integer pipeline on int32 arrays: a float input is
quantized per row with a dynamic scale (``bits``; I-ViT's scales come from the
preceding layer), the integer arithmetic runs exactly, and the result is returned in
float with its scale. Their gradients are the float op's (straight-through), so a
model with them trains as I-ViT's quantization-aware training does. Errors against the
float ops, measured in ``tests/test_robust_ops.py`` on normal inputs: Shiftmax within
0.025 of softmax per weight at 197 tokens (8-bit weights, truncated: such a row may sum
to less than 1), ShiftGELU within ``0.03 + |x| / 128`` of exact GELU (``x *
sigmoid(1.702 x)`` itself is 0.02 off; the 8-bit sigmoid adds the rest), I-LayerNorm
within 0.05 of LayerNorm. I-ViT states no such bounds (it reports accuracies), so
these are ours.

Written here because no JAX library provides them (qwix quantizes matmuls and
convolutions only).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SOFTMAXES = ("softmax", "clipped", "shiftmax")
ACTIVATIONS = ("gelu", "shiftgelu")
NORMS = ("layernorm", "ilayernorm")


@dataclasses.dataclass(frozen=True)
class BlockOps:
  """The ops of one block beyond the plain ViT's (hashable: a Flax module field)."""
  attention_gate: bool = False
  activation: str = "gelu"
  norm: str = "layernorm"


def check_settings(*, attention_softmax: str, softmax_zeta: float, softmax_gamma: float,
                   mlp_activation: str, norm_type: str, attention: str,
                   attention_dropout_rate: float) -> None:
  """One ValueError naming the setting for any bad value."""
  if attention_softmax not in SOFTMAXES:
    raise ValueError(f"attention_softmax must be one of {SOFTMAXES}, got "
                     f"{attention_softmax!r}")
  if attention_softmax == "clipped" and not (
      np.isfinite(softmax_zeta) and np.isfinite(softmax_gamma)
      and softmax_zeta >= 1.0 and softmax_gamma <= 0.0):
    raise ValueError("attention_softmax='clipped' needs softmax_zeta >= 1 and "
                     f"softmax_gamma <= 0 (the stretch beyond [0, 1]); got "
                     f"softmax_zeta={softmax_zeta}, softmax_gamma={softmax_gamma}")
  if attention_softmax != "softmax" and attention != "softmax":
    raise ValueError(f"attention_softmax={attention_softmax!r} replaces the softmax of "
                     f"softmax attention; attention={attention!r} has none")
  if attention_softmax != "softmax" and attention_dropout_rate:
    raise ValueError(f"attention_softmax={attention_softmax!r}: attention dropout runs "
                     "the plain reference; set attention_dropout_rate=0")
  if mlp_activation not in ACTIVATIONS:
    raise ValueError(f"mlp_activation must be one of {ACTIVATIONS}, got "
                     f"{mlp_activation!r}")
  if norm_type not in NORMS:
    raise ValueError(f"norm_type must be one of {NORMS}, got {norm_type!r}")


def softmax_fn(name: str, *, zeta: float = 1.0, gamma: float = 0.0) -> Callable:
  """``f(logits, axis=-1)`` for ``attention_softmax=name``."""
  if name == "clipped":
    return functools.partial(clipped_softmax, zeta=zeta, gamma=gamma)
  if name == "shiftmax":
    return shiftmax
  return jax.nn.softmax


def clipped_softmax(x: Array, axis: int = -1, *, zeta: float = 1.0,
                    gamma: float = 0.0) -> Array:
  """``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` (Bondarenko et al. 2023)."""
  return jnp.clip((zeta - gamma) * jax.nn.softmax(x, axis=axis) + gamma, 0.0, 1.0)


def _straight_through(exact: Array, integer: Array) -> Array:
  """``integer``'s values with ``exact``'s gradient."""
  return exact + jax.lax.stop_gradient(integer.astype(exact.dtype) - exact)


def _quantize(x: Array, bits: int, axis: int, min_range: float = 0.0
              ) -> tuple[Array, Array]:
  """Symmetric per-row quantization: ``(int32 values, float scale)``."""
  top = 2 ** (bits - 1) - 1
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  scale = jnp.maximum(amax, min_range if min_range else jnp.finfo(jnp.float32).tiny) / top
  return jnp.round(x / scale).astype(jnp.int32), scale


def _shift_exp(delta: Array, one: Array, extra_bits: int) -> Array:
  """I-ViT's Shift-Exp: ``exp(delta * S)`` for integers ``delta <= 0`` where
  ``one = floor(1 / S)``; the result is in units of ``S / 2**extra_bits``."""
  p = delta + (delta >> 1) - (delta >> 4)  # delta * log2(e), log2(e) ~ 1.0111b
  q = (-p) // one  # p = -q * one - r with 0 <= r < one
  r = -p - q * one
  b = one - (r >> 1)  # 2**(-r S) ~ 1 - r S / 2
  return (b << extra_bits) >> jnp.minimum(q, 31)


def _int_div(numerator: Array, denominator: Array, out_bits: int) -> Array:
  """I-ViT's IntDiv: ``numerator / denominator`` in steps of ``2**-(out_bits - 1)``,
  from one integer division per row (``0 <= numerator <= denominator < 2**31``).

  Both are first shifted right until the denominator fits 15 bits, so that the
  factor ``2**30 // denominator`` keeps 15 significant bits (I-ViT's int64 has the room
  to skip this) and ``numerator * factor`` stays within int32.
  """
  shift = jnp.maximum(32 - jax.lax.clz(denominator) - 15, 0)
  factor = (1 << 30) // jnp.maximum(denominator >> shift, 1)
  return ((numerator >> shift) * factor) >> (30 - (out_bits - 1))


def _shiftmax_int(x: Array, axis: int, bits: int, out_bits: int) -> Array:
  x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  live = x > jnp.finfo(jnp.float32).min / 2  # masked logits arrive as the minimum
  x = jnp.where(live, x, 0.0)
  values, scale = _quantize(x, bits, -1, min_range=1.0)  # one <= 2**(bits-1)
  delta = values - jnp.max(jnp.where(live, values, -(2 ** 30)), axis=-1, keepdims=True)
  one = jnp.maximum(jnp.floor(1.0 / scale), 1).astype(jnp.int32)  # 1.0 in units
  # Headroom so that the row sum stays below 2**30: (2**(bits-1)) * 2**extra * n.
  extra = max(30 - (bits - 1) - int(np.ceil(np.log2(max(x.shape[-1], 2)))), 0)
  e = jnp.where(live, _shift_exp(jnp.minimum(delta, 0), one, extra), 0)
  out = _int_div(e, jnp.sum(e, axis=-1, keepdims=True), out_bits)
  return jnp.moveaxis(out.astype(jnp.float32) / 2 ** (out_bits - 1), -1, axis)


def shiftmax(x: Array, axis: int = -1, *, bits: int = 16, out_bits: int = 8) -> Array:
  """I-ViT's Shiftmax (see the module docstring); the gradient is softmax's.

  ``x`` is quantized per row to ``bits`` (with a range of at least 1, so one unit of
  the exponent spans at least ``2**(bits-1) - 1`` steps); the weights come out in
  steps of ``2**-(out_bits - 1)``, truncated (a row may sum to slightly under 1).
  """
  exact = jax.nn.softmax(x.astype(jnp.float32), axis=axis)
  return _straight_through(exact, _shiftmax_int(x, axis, bits, out_bits)).astype(x.dtype)


def _shift_gelu_int(x: Array, bits: int, out_bits: int) -> Array:
  values, scale = _quantize(x.astype(jnp.float32), bits, -1, min_range=1.0)
  z = values + (values >> 1) + (values >> 3) + (values >> 4)  # 1.702 x ~ 1.1011b x
  one = jnp.maximum(jnp.floor(1.0 / scale), 1).astype(jnp.int32)  # 1.0 in units
  extra = 30 - (bits - 1) - 1  # two terms
  e = _shift_exp(-jnp.abs(z), one, extra)  # exp(-|z|)
  unit = one << extra  # exp(0)
  sigmoid = _int_div(jnp.where(z >= 0, unit, e), unit + e, out_bits)
  return (values * sigmoid).astype(jnp.float32) * scale / 2 ** (out_bits - 1)


def shift_gelu(x: Array, *, bits: int = 16, out_bits: int = 8) -> Array:
  """I-ViT's ShiftGELU over the last axis (rows quantized to ``bits``); the gradient
  is exact GELU's."""
  exact = nn.gelu(x.astype(jnp.float32), approximate=False)
  return _straight_through(exact, _shift_gelu_int(x, bits, out_bits)).astype(x.dtype)


def integer_sqrt(n: Array, iterations: int = 16) -> Array:
  """``floor(sqrt(n))`` of non-negative int32 by I-ViT's Newton iteration."""
  n = n.astype(jnp.int32)
  bit_length = 32 - jax.lax.clz(n)
  s = jnp.left_shift(jnp.int32(1), (bit_length + 1) // 2)  # >= sqrt(n)

  def step(_, s):
    return jnp.minimum(s, (s + n // jnp.maximum(s, 1)) >> 1)  # decreases to the floor

  return jnp.where(n > 0, jax.lax.fori_loop(0, iterations, step, s), 0)


# Fixed-point bits: of the mean (below the int8 unit) and of the normalized output.
_MEAN_FRACTION_BITS = 2
_OUT_FRACTION_BITS = 8


def _layer_norm_int(x: Array, bits: int) -> Array:
  """Normalized ``x`` (no affine) through I-ViT's integer LayerNorm."""
  channels = x.shape[-1]
  f = _MEAN_FRACTION_BITS
  span = 2 ** (bits + f)  # |deviation| bound in fixed-point units
  if channels * span ** 2 >= 2 ** 31:
    raise ValueError(f"norm_type='ilayernorm': {channels} channels of {bits}-bit "
                     "values overflow the int32 variance; use fewer bits")
  values, _ = _quantize(x.astype(jnp.float32), bits, -1)  # LayerNorm ignores the scale
  mean = ((jnp.sum(values, -1, keepdims=True) << f) + channels // 2) // channels
  deviation = (values << f) - mean
  variance = jnp.sum(deviation * deviation, -1, keepdims=True) // channels
  # std * 2**s from the integer square root of variance * 2**(2s), inside int32.
  s = max((31 - int(np.ceil(np.log2(span ** 2)))) // 2, 0)
  std = jnp.maximum(integer_sqrt(variance << (2 * s)), 1)
  out = (deviation << (s + _OUT_FRACTION_BITS)) // std
  return out.astype(jnp.float32) / 2 ** _OUT_FRACTION_BITS


class ILayerNorm(nn.Module):
  """I-ViT's integer LayerNorm, parameters as ``nn.LayerNorm`` (``scale``, ``bias``).

  ``epsilon`` only enters the straight-through gradient (the float LayerNorm's); the
  integer path divides by the integer standard deviation (at least one unit).
  """
  epsilon: float = 1e-6
  bits: int = 8
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    exact = (xf - mean) * jax.lax.rsqrt(jnp.var(xf, -1, keepdims=True) + self.epsilon)
    y = _straight_through(exact, _layer_norm_int(x, self.bits))
    return (y * scale + bias).astype(self.dtype)


def activation_fn(name: str) -> Callable:
  return shift_gelu if name == "shiftgelu" else None  # None: the MLP's GELU
