"""Optimizers and learning-rate schedules from the config, built on optax."""

import re
from typing import Any

import jax
import optax

from vit_jax import tree

# Weight decay applies to weight matrices and conv kernels, which Flax names
# "kernel" (big_vision's rule). Biases (also the 2-d [heads, head_dim] attention
# biases), norm scales, position embeddings, class tokens, probes and relative
# position tables are left alone.
DEFAULT_WD_PATTERN = r"(^|/)kernel$"


def learning_rate_schedule(base_lr: float, total_steps: int, *, warmup_steps: int = 0,
                           decay: str = "cosine", end_factor: float = 0.0) -> optax.Schedule:
  """Linear warmup to ``base_lr``, then cosine, linear or no decay to ``end_factor``."""
  if warmup_steps >= total_steps and total_steps > 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be below total_steps={total_steps}")
  decay_steps = max(total_steps - warmup_steps, 1)
  if decay == "cosine":
    main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_factor)
  elif decay == "linear":
    main = optax.linear_schedule(base_lr, base_lr * end_factor, decay_steps)
  elif decay == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise ValueError(f"unknown decay {decay!r}; use 'cosine', 'linear' or 'constant'")
  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def weight_decay_mask(params: Any, pattern: str = DEFAULT_WD_PATTERN) -> Any:
  """True for the parameters whose ``/``-joined name matches ``pattern``."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(regex.search(tree.path_name(path))), params)


def make_optimizer(config: Any, schedule: optax.Schedule, params: Any
                   ) -> optax.GradientTransformation:
  """Builds the optimizer named by ``config.name`` ("adamw" or "sgd")."""
  mask = weight_decay_mask(params, config.get("wd_pattern", DEFAULT_WD_PATTERN))
  parts = []
  if config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.name == "adamw":
    parts.append(optax.adamw(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                             eps=config.get("eps", 1e-8),
                             weight_decay=config.get("weight_decay", 0.0), mask=mask))
  elif config.name == "sgd":
    # Classic L2 regularisation: decay enters the gradient before momentum.
    if config.get("weight_decay"):
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=config.get("momentum", 0.9),
                           nesterov=config.get("nesterov", False)))
  else:
    raise ValueError(f"unknown optimizer {config.name!r}; use 'adamw' or 'sgd'")
  return optax.chain(*parts)
