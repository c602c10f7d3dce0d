"""Optimizers and learning-rate schedules from the config, built on optax."""

import re
from typing import Any

import jax
import optax

# Parameters that never get weight decay, besides every 0/1-d parameter (biases,
# norm scales): position embeddings, class tokens and attention-pooling probes.
DEFAULT_WD_EXCLUDE = r"(^|/)(pos_embedding|cls|probe|dist|relative_position_bias_table)$"


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


def path_name(path) -> str:
  """``(DictKey('a'), DictKey('b'))`` -> ``"a/b"``."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params: Any, exclude: str = DEFAULT_WD_EXCLUDE) -> Any:
  """True for parameters that get weight decay: matrices and kernels only."""
  pattern = re.compile(exclude)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not pattern.search(path_name(path)), params)


def make_optimizer(config: Any, schedule: optax.Schedule, params: Any
                   ) -> optax.GradientTransformation:
  """Builds the optimizer named by ``config.name`` ("adamw" or "sgd")."""
  mask = weight_decay_mask(params, config.get("wd_exclude", DEFAULT_WD_EXCLUDE))
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
