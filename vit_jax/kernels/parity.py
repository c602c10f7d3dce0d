"""Kernel vs reference: outputs and gradients, with the package's tolerances.

One home for the comparison that the tests (``tests/test_kernels.py``) assert and
the device check (``vit_jax.tools.device_check``) reports: forward output and the
VJP of a fixed random cotangent for every differentiable argument.

Tolerances: float32 within ``1e-5`` (relative to the largest reference value when
that exceeds 1, e.g. a bias gradient summed over windows); bfloat16/float16 within
``2e-2`` relative to the float32 reference computed on the same (rounded) inputs.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Difference:
  what: str  # "output" or "gradient of argument i"
  max_error: float
  scale: float  # largest |reference| value
  tolerance: float  # the bound max_error must not exceed

  @property
  def ok(self) -> bool:
    return self.scale > 0 and self.max_error <= self.tolerance


def normal(seed: int, shape) -> jax.Array:
  # numpy, not jax.random: compiling threefry for every shape costs seconds on CPU.
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def outputs_and_grads(fn: Callable, args, argnums, cotangent):
  """``fn(*args)`` and the VJP of ``cotangent`` w.r.t. ``args[argnums]`` (one jit)."""
  def run(*args):
    def partial(*diff):
      full = list(args)
      for i, d in zip(argnums, diff):
        full[i] = d
      return fn(*full)
    out, vjp = jax.vjp(partial, *(args[i] for i in argnums))
    return out, vjp(cotangent.astype(out.dtype))
  return jax.jit(run)(*args)


def compare(kernel_fn: Callable, reference_fn: Callable, args: Sequence,
            argnums: Sequence[int], dtype=jnp.float32) -> list[Difference]:
  """Runs both on ``args`` (4-D and larger arrays cast to ``dtype``) and compares.

  The reference always runs in float32 on the same (possibly rounded) inputs.
  """
  args = [None if a is None else jnp.asarray(a) for a in args]
  out_shape = jax.eval_shape(reference_fn, *args)
  cotangent = normal(99, out_shape.shape)
  cast = lambda a: a if a is None or a.ndim < 4 else a.astype(dtype)
  got = outputs_and_grads(kernel_fn, [cast(a) for a in args], argnums, cotangent)
  exact = [None if a is None else cast(a).astype(jnp.float32) for a in args]
  want = outputs_and_grads(reference_fn, exact, argnums, cotangent)
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  if not len(got_leaves) == len(want_leaves) == 1 + len(argnums):
    raise ValueError(f"expected {1 + len(argnums)} outputs and gradients, got "
                     f"{len(got_leaves)} and {len(want_leaves)}")
  half = jnp.dtype(dtype) != jnp.float32
  differences = []
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    what = "output" if i == 0 else f"gradient of argument {argnums[i - 1]}"
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    if g.shape != w.shape:
      raise ValueError(f"{what}: shape {g.shape} != reference {w.shape}")
    scale = float(np.abs(w).max())
    tolerance = 2e-2 * scale if half else 1e-5 * max(1.0, scale)
    differences.append(Difference(what, float(np.abs(g - w).max()), scale, tolerance))
  return differences
