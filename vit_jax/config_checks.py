"""Up-front checks of a training config's numeric settings, and what a resume changed.

``validate`` runs before anything is built or written, so a bad value stops the run
with one line naming the key and what it may be (``config.log_every=0: must be an
integer >= 1``) rather than a ZeroDivisionError deep in the loop. A key a config does
not have is skipped: one table serves both trainers.
"""

import math
from typing import Any, Callable, Mapping, Optional

# (key, test, what is allowed). Unset (None) values are skipped: they mean "off" or
# "use the default".
_Rule = tuple[str, Callable[[Any], bool], str]


def _integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _int_at_least(low: int) -> Callable[[Any], bool]:
  return lambda v: _integer(v) and v >= low


def _in_range(low: float, high: float, high_open: bool = False) -> Callable[[Any], bool]:
  return lambda v: _number(v) and low <= v and (v < high if high_open else v <= high)


_POSITIVE_INT = (_int_at_least(1), "an integer >= 1")
_NON_NEGATIVE_INT = (_int_at_least(0), "an integer >= 0")
_POSITIVE = (lambda v: _number(v) and v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: _number(v) and v >= 0, "a finite number >= 0")
_FRACTION = (_in_range(0.0, 1.0, high_open=True), "a number in [0, 1)")
_PROBABILITY = (_in_range(0.0, 1.0), "a number in [0, 1]")
# A model size: an int must be >= 1; other types (a per-stage tuple) are the model
# registry's to check.
_SIZE = (lambda v: isinstance(v, bool) or not isinstance(v, (int, float))
         or (_integer(v) and v >= 1), "an integer >= 1")
_MESH_AXIS = (lambda v: _integer(v) and (v >= 1 or v == -1),
              "an integer >= 1, or -1 for all remaining devices")

RULES: tuple[_Rule, ...] = tuple((key,) + rule for key, rule in (
    ("seed", _NON_NEGATIVE_INT),  # numpy's seed sequences take no negative seed
    ("total_steps", _POSITIVE_INT),
    ("num_epochs", _POSITIVE),
    ("total_samples", _POSITIVE_INT),
    ("grad_accum_steps", _POSITIVE_INT),
    ("log_every", _POSITIVE_INT),
    ("eval_every", (_int_at_least(0), "an integer >= 0 (0: only at the end)")),
    ("profile_steps", (_int_at_least(0), "an integer >= 0 (0: no profile)")),
    ("checkpoint_every", _POSITIVE_INT),
    ("keep_checkpoints", _POSITIVE_INT),
    ("label_smoothing", _FRACTION),
    ("max_logit_scale", _POSITIVE),
    ("siglip_chunk_size", _POSITIVE_INT),
    ("ema_decay", _FRACTION),
    ("input.batch_size", _POSITIVE_INT),
    ("input.eval_batch_size", _POSITIVE_INT),
    ("input.shuffle_buffer", _POSITIVE_INT),
    ("input.data_shards", _POSITIVE_INT),
    ("input.shards_per_window", _POSITIVE_INT),
    ("input.window_bytes", _POSITIVE_INT),
    ("input.threads", _POSITIVE_INT),
    ("tokenizer.context_length", _POSITIVE_INT),
    ("mesh.data", _MESH_AXIS),
    ("mesh.fsdp", _MESH_AXIS),
    ("mesh.tensor", _MESH_AXIS),
    ("sharding.fsdp_min_size", _NON_NEGATIVE_INT),
    ("optimizer.learning_rate", _NON_NEGATIVE),
    ("optimizer.b1", _FRACTION),
    ("optimizer.b2", _FRACTION),
    ("optimizer.eps", _NON_NEGATIVE),
    ("optimizer.momentum", _FRACTION),
    ("optimizer.weight_decay", _NON_NEGATIVE),
    ("optimizer.grad_clip_norm", (_NON_NEGATIVE[0], "a finite number >= 0 (0: off)")),
    ("optimizer.layer_decay", (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")),
    ("schedule.warmup_steps", _NON_NEGATIVE_INT),
    ("schedule.end_factor", _NON_NEGATIVE),
    ("model.dropout_rate", _FRACTION),
    ("model.drop_path_rate", _FRACTION),
    ("mixup.mixup_alpha", _NON_NEGATIVE),
    ("mixup.cutmix_alpha", _NON_NEGATIVE),
    ("mixup.switch_prob", _PROBABILITY),
    ("mixup.mixpro_alpha", _NON_NEGATIVE),
    ("mixup.mixpro_cell", _NON_NEGATIVE_INT),
    ("distillation.alpha", _PROBABILITY),
    ("distillation.tau", _POSITIVE),
    ("dynamic_vit.distill_weight", _NON_NEGATIVE),
    ("model.token_pruning_ratio_weight", _NON_NEGATIVE),
    ("lora.rank", _NON_NEGATIVE_INT),
    ("lora.alpha", _POSITIVE),
    ("sparsity.n", _NON_NEGATIVE_INT),
    ("sparsity.m", _NON_NEGATIVE_INT),
    ("sparsity.sparsity", _FRACTION),
    ("sparsity.start_step", _NON_NEGATIVE_INT),
    ("sparsity.update_every", _POSITIVE_INT),
    ("input.packing.seq_len", (_int_at_least(0), "an integer >= 0 (0: no packing)")),
    ("input.packing.images_per_pack", _NON_NEGATIVE_INT),
    ("mae.mask_ratio", _FRACTION),
    ("mae.decoder_width", _POSITIVE_INT),
    ("mae.decoder_depth", _POSITIVE_INT),
    ("mae.decoder_heads", _POSITIVE_INT),
    ("mae.decoder_mlp_dim", _POSITIVE_INT),
)) + tuple((f"model.{tower}{key}", *_SIZE)
           for tower in ("", "image.", "text.")
           for key in ("hidden_size", "mlp_dim", "num_heads", "num_layers", "patch_size",
                       "image_size", "embed_dim", "context_length", "vocab_size"))


def _lookup(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if node is None or not hasattr(node, "get"):
      return None
    node = node.get(part)
  return node


def validate(config: Any) -> None:
  """ValueError naming the first setting outside its allowed range."""
  for key, test, allowed in RULES:
    value = _lookup(config, key)
    if value is None:
      continue
    if not test(value):
      raise ValueError(f"config.{key}={value!r}: must be {allowed}")
  mesh = _lookup(config, "mesh") or {}
  if sum(1 for axis in ("data", "fsdp", "expert", "tensor") if mesh.get(axis) == -1) > 1:
    raise ValueError(f"config.mesh={dict(mesh)!r}: at most one axis may be -1")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def changed_settings(saved: Optional[Mapping[str, Any]],
                     current: Optional[Mapping[str, Any]]) -> list[str]:
  """``["total_steps: 100 -> 200", ...]``: the config keys whose value differs.

  Empty when either config is unknown (a checkpoint written without one).
  """
  if not saved or not current:
    return []
  before, after = _flatten(saved), _flatten(current)
  missing = object()
  changes = []
  for key in sorted(set(before) | set(after)):
    old, new = before.get(key, missing), after.get(key, missing)
    if old != new:
      show = lambda v: "(unset)" if v is missing else repr(v)
      changes.append(f"{key}: {show(old)} -> {show(new)}")
  return changes
