"""Sparse training: N:M (e.g. 2:4) and global magnitude pruning as an optax wrapper.

Written here because no maintained library installs with our JAX: jaxpruner has no
release pip can install, and qwix's sparsity (``qwix.contrib.sparsity``) is for Flax
NNX modules only. ``prune(tx, params, ...)`` wraps an optimizer: after each update the
kernels matching ``targets`` are multiplied by a mask recomputed from their magnitudes
every ``update_every`` steps from ``start_step`` on. The masks live in the optimizer
state, so they are checkpointed and resumed with it; the returned parameters are
already pruned (zeros in place), so the exported weights are the sparse ones.

N:M groups run along a kernel's input (contracted) dimension, the first axis of a Flax
Dense kernel ``(in, out)``: in every group of M consecutive inputs of one output unit,
the N of largest magnitude are kept (for an attention output kernel
``(heads, head_dim, out)`` that first axis is the heads). XLA has no sparse tensor-core path for these
(jax-ml/jax#19212), so the pruned model computes as fast as the dense one.
"""

import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from vit_jax import tree

DEFAULT_TARGETS = r"(^|/)kernel$"


def nm_mask(kernel: jax.Array, n: int, m: int) -> jax.Array:
  """Keeps the ``n`` largest magnitudes in each group of ``m`` along axis 0."""
  size = kernel.shape[0]
  if size % m:
    raise ValueError(f"sparsity: {m=} does not divide the input dimension {size}")
  groups = jnp.abs(kernel).reshape((size // m, m) + kernel.shape[1:])
  # Rank of each entry within its group (0 = largest); ties broken by position.
  ranks = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1)
  return (ranks < n).reshape(kernel.shape)


def magnitude_masks(kernels: dict, sparsity: float) -> dict:
  """Global magnitude pruning: zeroes the ``sparsity`` fraction of smallest entries
  over all ``kernels`` together."""
  values = jnp.concatenate([jnp.abs(k).reshape(-1) for k in kernels.values()])
  count = int(round(sparsity * values.size))
  if count == 0:
    return {name: jnp.ones(k.shape, bool) for name, k in kernels.items()}
  threshold = jnp.sort(values)[count - 1]
  return {name: jnp.abs(k) > threshold for name, k in kernels.items()}


class PruneState(NamedTuple):
  inner: Any
  masks: Any  # bool per parameter (all True where not targeted or not yet pruned)
  count: jax.Array


def _selected(params: Any, targets: str) -> Any:
  regex = re.compile(targets)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: bool(regex.search(tree.path_name(path))) and x.ndim >= 2, params)


def prune(tx: optax.GradientTransformation, params: Any, *, n: int = 0, m: int = 0,
          sparsity: float = 0.0, targets: str = DEFAULT_TARGETS, start_step: int = 0,
          update_every: int = 100) -> optax.GradientTransformation:
  """``tx`` followed by pruning to N:M (``n``, ``m``) or to a global ``sparsity``.

  ``params`` (possibly abstract) fixes which parameters ``targets`` selects.
  """
  if bool(m) == bool(sparsity):
    raise ValueError("sparsity: set either n and m (N:M) or sparsity (global magnitude), "
                     f"got n={n} m={m} sparsity={sparsity}")
  if m and not 0 < n < m:
    raise ValueError(f"sparsity: N:M needs 0 < n < m, got n={n} m={m}")
  if sparsity and not 0 < sparsity < 1:
    raise ValueError(f"sparsity: sparsity={sparsity} must lie in (0, 1)")
  selected = _selected(params, targets)
  if not any(jax.tree.leaves(selected)):
    raise ValueError(f"sparsity: targets={targets!r} selects no kernel")

  def compute_masks(params):
    leaves, treedef = jax.tree.flatten(params)
    chosen = treedef.flatten_up_to(selected)
    if m:
      masks = [nm_mask(p, n, m) if c else jnp.ones(p.shape, bool)
               for p, c in zip(leaves, chosen)]
    else:
      kernels = {i: p for i, (p, c) in enumerate(zip(leaves, chosen)) if c}
      found = magnitude_masks(kernels, sparsity)
      masks = [found.get(i, jnp.ones(p.shape, bool)) for i, p in enumerate(leaves)]
    return treedef.unflatten(masks)

  def init(params):
    return PruneState(tx.init(params), jax.tree.map(lambda p: jnp.ones(p.shape, bool),
                                                    params), jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("sparsity: the pruning wrapper needs params in tx.update")
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    due = (state.count >= start_step) & ((state.count - start_step) % update_every == 0)
    masks = jax.lax.cond(due, compute_masks, lambda _: state.masks, new_params)
    # The update that lands the parameters on their pruned values.
    updates = jax.tree.map(lambda new, old, keep: jnp.where(keep, new, 0) - old,
                           new_params, params, masks)
    return updates, PruneState(inner, masks, state.count + 1)

  return optax.GradientTransformation(init, update)


def from_config(tx: optax.GradientTransformation, params: Any, config: Optional[Any]
                ) -> optax.GradientTransformation:
  """``prune`` with ``config.sparsity`` (n, m, sparsity, targets, start_step,
  update_every), or ``tx`` itself when that is unset or empty."""
  if not config or not (config.get("m") or config.get("sparsity")):
    return tx
  return prune(tx, params, n=config.get("n") or 0, m=config.get("m") or 0,
               sparsity=config.get("sparsity") or 0.0,
               targets=config.get("targets") or DEFAULT_TARGETS,
               start_step=config.get("start_step") or 0,
               update_every=config.get("update_every") or 100)


def report(params: Any, targets: str = DEFAULT_TARGETS) -> dict[str, float]:
  """Fraction of zeros in each targeted kernel (by path), and ``"global"`` over all."""
  selected = _selected(params, targets)
  found, zeros, total = {}, 0, 0
  for (path, p), chosen in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(selected)):
    if chosen:
      z = int(jnp.sum(p == 0))
      found[tree.path_name(path)] = z / p.size
      zeros, total = zeros + z, total + p.size
  found["global"] = zeros / max(total, 1)
  return found
