"""What each Pallas target allows, and the helpers the kernels share.

The ``pallas_call`` kernels (``*/pallas.py``) have two block configurations:

- ``"tpu"``: Mosaic (TPU). The last two dimensions of every block must be multiples
  of (8, 128) or equal to the array's, so kernels use the head-major layout
  ``[batch, heads, tokens, head_dim]`` (tokens on the sublane axis, head_dim whole)
  with token blocks that are multiples of 128.
- ``"triton"``: Pallas' Triton lowering on GPU, selected by passing Triton compiler
  params. JAX deprecates that lowering in favour of Mosaic GPU (from 0.11), so it
  runs only when asked for (``impl="pallas_triton"``): an explicit fallback. Every
  value a kernel loads or stores must have a power-of-two number of elements and
  ``jnp.dot`` operands need every dimension >= 16, so token blocks are powers of two
  >= 16 and head dims are padded to the next power of two. Grid programs run
  concurrently: a reduction across programs is a race, so reductions loop inside
  one program and write per-program partial results.

GPU kernels on the supported path are Mosaic GPU kernels (``plgpu.kernel``, in
``*/mosaic_gpu.py``), which have their own tiling rules (64-row ``wgmma`` tiles,
128-byte swizzled shared-memory tiles).

On CPU every kernel runs in an interpret mode (``pallas_call``: either configuration;
Mosaic GPU: GPU interpret mode). The tests additionally *lower* each kernel for CUDA
and TPU to catch block shapes, layouts or operations those backends refuse. Lowering
is not compiling: the device compilers can still reject a kernel; only a run on the
hardware settles it (``python -m vit_jax.tools.device_check``).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

BACKENDS = ("triton", "tpu")  # pallas_call block configurations
ACCELERATORS = ("gpu", "tpu")  # platforms where kernels compile

# dot operands on Triton need every dimension >= 16.
TRITON_MIN_DIM = 16
# Mosaic: (sublane, lane) tiling of the last two block dimensions.
TPU_SUBLANES, TPU_LANES = 8, 128


def platform() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"``: where arrays live by default."""
  here = jax.default_backend()
  return here if here in ACCELERATORS else "cpu"


def resolve(backend: Optional[str], interpret: Optional[bool]) -> tuple[str, bool]:
  """Fills in the ``pallas_call`` configuration for the current platform.

  TPU: ``"tpu"``; GPU and CPU: ``"triton"`` (on CPU in interpret mode, where the
  tests exercise both configurations).
  """
  here = platform()
  if interpret is None:
    interpret = here not in ACCELERATORS
  if backend is None:
    backend = "tpu" if here == "tpu" else "triton"
  if backend not in BACKENDS:
    raise ValueError(f"Pallas backend must be one of {BACKENDS}, got {backend!r}")
  return backend, interpret


def next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


def cdiv(a: int, b: int) -> int:
  return -(-int(a) // b)


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads ``axis`` of ``x`` at the end to ``size`` (no copy when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def padded_head_dim(head_dim: int, backend: str) -> int:
  """Triton: next power of two (>= 16); TPU: the head dim itself (whole-axis blocks)."""
  if backend == "triton":
    return max(TRITON_MIN_DIM, next_pow2(head_dim))
  return head_dim


def compiler_params(backend: str, interpret: bool, num_grid_dims: int, *,
                    num_warps: int = 4, num_stages: int = 2,
                    arbitrary: tuple[int, ...] = ()):
  """Triton params (they select the Triton lowering) or Mosaic (TPU) params."""
  if interpret:
    return None
  if backend == "triton":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  semantics = tuple("arbitrary" if i in arbitrary else "parallel"
                    for i in range(num_grid_dims))
  return pltpu.CompilerParams(dimension_semantics=semantics)


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False,
        trans_b: bool = False) -> jax.Array:
  """``a @ b`` with float32 accumulation; float32 operands use full precision.

  (On GPU, float32 dots would otherwise run as TF32 and miss the 1e-5 parity.)
  """
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  precision = (jax.lax.Precision.HIGHEST
               if jnp.float32 in (a.dtype, b.dtype) else None)
  return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


@functools.cache
def _cost_estimate_cls():
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  return pl.CostEstimate


def cost_estimate(flops: float, transcendentals: float, bytes_accessed: float):
  """Tells XLA's scheduler what a kernel costs (it cannot look inside)."""
  return _cost_estimate_cls()(flops=int(flops), transcendentals=int(transcendentals),
                              bytes_accessed=int(bytes_accessed))
