"""Dense layers whose products run on two-dimensional views on CPU.

A dense layer applied to ``[batch, tokens, channels]`` contracts the last axis; its
weight gradient then contracts batch *and* tokens. XLA canonicalises a product with
two contracting axes by transposing one operand (on XLA:CPU a ``copy_bitcast_fusion``
of the output gradient before every weight-gradient product: 4-14% of the train steps
profiled for issue 25). Reshaping the input to ``[batch * tokens, channels]`` first,
free for a row-major array, leaves one contracting axis in both products and no copy.
Measured on the 2-core CPU, batch 8, float32, one process, interleaved
(``python -m vit_jax.tools.layers_ab``; ``docs/benchmarks.md``, "Dense layers on
two-dimensional views"): forward + both gradients of one layer ``[8,197,192] -> 768``
1.17x, ``[8,3136,32] -> 256`` 2.21x, ``[8,56,56,96] -> 384`` 1.73x; whole train steps
1.02x (ViT-Ti) to 1.23x (EfficientViT-B1).

Only CPU takes the reshape: on TPU, merging a token axis that is not a multiple of 8
into the batch is a relayout copy, and neither accelerator was measured. Nor does a
product someone intercepts (qwix's quantization patches ``lax.dot_general``): its
per-channel and calibrated scales have the shapes of the operands the layer wrote.

``Dense`` / ``DenseGeneral`` are ``nn.Dense`` / ``nn.DenseGeneral`` with ``dot_general``
defaulting to ``dot_general`` below: same fields, parameters and initialisation, and
``isinstance`` still holds (LoRA's interceptor matches them).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
from jax import lax

Array = jax.Array

_LAX_DOT_GENERAL = lax.dot_general
_LAX_DOT_GENERAL_CODE = lax.dot_general.__code__


def _intercepted() -> bool:
  """Whether ``lax.dot_general`` is patched now (qwix replaces the attribute or,
  where it can, the function's code)."""
  return (lax.dot_general is not _LAX_DOT_GENERAL
          or getattr(lax.dot_general, "__code__", None) is not _LAX_DOT_GENERAL_CODE)


def dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Optional[Any] = None) -> Array:
  """``lax.dot_general``; on CPU, a dense layer's product (``lhs``'s trailing axes
  against ``rhs``'s leading axes, no batch axes) runs as one 2-D matrix product."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  lhs_contract = tuple(d % lhs.ndim for d in lhs_contract)
  rhs_contract = tuple(d % rhs.ndim for d in rhs_contract)
  dense = (not lhs_batch and not rhs_batch and 0 < n < lhs.ndim and n < rhs.ndim
           and lhs_contract == tuple(range(lhs.ndim - n, lhs.ndim))
           and rhs_contract == tuple(range(n)))
  if (not dense or (lhs.ndim == 2 and rhs.ndim == 2) or jax.default_backend() != "cpu"
      or not isinstance(lhs, jax.Array) or not isinstance(rhs, jax.Array)
      or _intercepted()):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  lead, features = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
  inner = math.prod(lhs.shape[lhs.ndim - n:])
  out = lax.dot_general(lhs.reshape(math.prod(lead), inner),
                        rhs.reshape(inner, math.prod(features)),
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
  return out.reshape(lead + features)


class Dense(nn.Dense):
  """``nn.Dense`` through ``dot_general`` (2-D product on CPU)."""
  dot_general: Any = dot_general


class DenseGeneral(nn.DenseGeneral):
  """``nn.DenseGeneral`` through ``dot_general`` (2-D product on CPU)."""
  dot_general: Any = dot_general
