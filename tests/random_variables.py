"""Random model variables without compiling ``model.init``.

Compiling a Flax ``init`` costs seconds on CPU (one threefry/truncated-normal
computation per parameter), several times the cost of compiling the forward pass.
Wiring tests only need some non-trivial values of the right shapes: take the shapes
from ``jax.eval_shape`` and fill them from numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, *args, seed: int = 0, scale: float = 0.1, **kwargs) -> dict:
  """Variables shaped like ``model.init(key, *args, **kwargs)``, filled with noise.

  Parameters are ``N(0, scale^2)``; BatchNorm ``var`` statistics are positive.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    value = rng.randn(*leaf.shape) * scale
    if getattr(path[-1], "key", None) == "var":
      value = 1.0 + np.abs(value)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
