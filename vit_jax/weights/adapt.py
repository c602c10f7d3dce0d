"""Adapters: fit a checkpoint's arrays to the target model, and report what changed.

* parameters matching ``reinit`` (default: the classification head) come from the
  fresh initialisation when the checkpoint lacks them or their shape differs (a new
  class count);
* a learned position embedding of another grid is resampled (``resample.py``,
  bicubic with antialias by default, class token kept); a big_vision embedding
  without a class-token slot gets a zero slot (big_vision adds no position to it);
* relative position bias tables of windowed models are resized for a new window;
* ``encoderblock_{i}`` and scanned ``encoderblock`` layouts are converted;
* upcycling: a mixture-of-experts layer the checkpoint lacks (``.../Moe/Experts/...``,
  ``models/moe.py``) gets a copy of the checkpoint's dense MLP of that block in every
  expert (sparse upcycling, Komatsuzaki et al. 2023); its router starts fresh.

Anything else that does not fit -- a missing, unexpected or shape-mismatched
parameter -- raises ``LoadError`` naming the keys, unless ``allow_partial``.
"""

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax import checkpoint, tree
from vit_jax.models import vit
from vit_jax.weights import resample
from vit_jax.weights.files import LoadError

DEFAULT_REINIT = r"^head/"
POSEMB = re.compile(r"(^|/)posembed_input/pos_embedding$")
REL_POS_TABLE = re.compile(r"(^|/)relative_position_bias_table$")
EXPERTS = re.compile(r"^(.*)/Moe/Experts/(Dense_[01]/(kernel|bias))$")


@dataclasses.dataclass
class LoadReport:
  """What happened to each parameter name (``/``-joined) while loading."""
  source: str
  format: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  reinitialised: list[str] = dataclasses.field(default_factory=list)
  resampled: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)
  upcycled: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    parts = [f"loaded {len(self.loaded)} arrays from {self.source} ({self.format})"]
    for title, names in (("upcycled (dense MLP copied to every expert)", self.upcycled),
                         ("new (fresh init)", self.reinitialised),
                         ("resampled", self.resampled),
                         ("missing (fresh init)", self.missing),
                         ("unexpected (dropped)", self.unexpected),
                         ("shape mismatch (fresh init)", self.mismatched)):
      if names:
        lora_names = [n for n in names if n.startswith("lora__")]
        if lora_names:  # fresh LoRA adapters by design: count them, do not list them
          names = [n for n in names if not n.startswith("lora__")] + [
              f"{len(lora_names)} LoRA adapter arrays"]
        parts.append(f"{title}: {', '.join(names)}")
    return "; ".join(parts)


def match_block_layout(flat: dict, target: Mapping[str, Any]) -> dict:
  """The checkpoint's ViT blocks stacked or unstacked like the target's (scan_layers)."""
  scanned = lambda names: any("/encoderblock/" in n for n in names)
  if scanned(flat) == scanned(target):
    return flat
  convert_fn = vit.stack_block_params if scanned(target) else vit.unstack_block_params
  return tree.flatten(convert_fn(tree.unflatten(flat)))


def upcycle_experts(flat: dict, target: Mapping[str, Any],
                    report: LoadReport) -> tuple[dict, set[str]]:
  """Dense MLPs -> the experts of the target's MoE layers the checkpoint lacks.

  Returns the arrays (each used ``MlpBlock_3`` replaced by its ``Moe/Experts`` copies)
  and the names of the upcycled layers' router parameters, which start fresh.
  """
  out, used, routers = dict(flat), set(), set()
  for name, abstract in target.items():
    match = EXPERTS.match(name)
    dense = match and f"{match.group(1)}/MlpBlock_3/{match.group(2)}"
    if not match or name in flat or dense not in flat:
      continue
    value = np.asarray(flat[dense])
    if tuple(abstract.shape[1:]) != value.shape:
      continue  # left for the shape-mismatch report
    out[name] = np.broadcast_to(value, tuple(abstract.shape)).copy()
    used.add(dense)
    report.upcycled.append(f"{dense} -> {name} x{abstract.shape[0]}")
    routers |= {n for n in target if n.startswith(f"{match.group(1)}/Moe/Router/")}
  for dense in used:
    del out[dense]
  return out, routers - set(flat)


def resample_posemb(value: np.ndarray, target_shape: tuple, prefix: int,
                    old_size: Optional[tuple], method: str, antialias: bool) -> np.ndarray:
  """Resizes ``[1, p + h*w, D]``; adds a zero class slot to a slot-less source."""
  new_tokens = target_shape[1] - prefix
  new_side = int(round(math.sqrt(new_tokens)))
  if new_side * new_side != new_tokens:
    raise LoadError(f"cannot resample a position embedding to {target_shape}: the "
                    "target grid is not square")
  src_prefix = prefix
  src_tokens = value.shape[1] - prefix
  if prefix and int(math.isqrt(value.shape[1])) ** 2 == value.shape[1] and (
      int(math.isqrt(src_tokens)) ** 2 != src_tokens):
    src_prefix = 0  # big_vision: the class token carries no position
  if src_prefix != prefix:
    value = np.concatenate([np.zeros((1, prefix, value.shape[2]), value.dtype), value], 1)
  return np.asarray(resample.resample_posemb(
      value, (new_side, new_side), old_size=old_size, num_prefix_tokens=prefix,
      method=method, antialias=antialias))


def resize_table(value: np.ndarray, target_shape: tuple) -> np.ndarray:
  """A relative position bias table for the window the target's shape implies."""
  if len(target_shape) == 3:
    window = ((target_shape[1] + 1) // 2, (target_shape[2] + 1) // 2)
  else:
    side = int(round(math.sqrt(target_shape[0])))
    window = ((side + 1) // 2, (side + 1) // 2)
  return np.asarray(resample.resize_rel_pos_bias_table(value, window))


def adapt(source: dict[str, np.ndarray], target: Mapping[str, Any], fresh: Mapping[str, Any],
          report: LoadReport, *, reinit: str = DEFAULT_REINIT, allow_partial: bool = False,
          posemb_old_size: Optional[tuple] = None, posemb_method: str = "bicubic",
          posemb_antialias: bool = True) -> dict:
  """Flat source arrays -> flat arrays with exactly the target's names and shapes.

  ``target`` maps names to shapes and dtypes, ``fresh`` to freshly initialised
  arrays (what re-initialised and, with ``allow_partial``, missing names get).
  """
  source = match_block_layout(dict(source), target)
  source, routers = upcycle_experts(source, target, report)
  reinit_re = re.compile(reinit) if reinit else None
  prefix = 1 if "cls" in target else 0
  out, missing, mismatched = {}, [], []
  for name, abstract in target.items():
    shape = tuple(abstract.shape)
    if name not in source:
      if (reinit_re and reinit_re.search(name)) or name in routers:
        report.reinitialised.append(name)
      else:
        missing.append(name)
      out[name] = fresh[name]
      continue
    value = np.asarray(source[name])
    if value.shape != shape:
      if POSEMB.search(name) and value.ndim == 3:
        value = resample_posemb(value, shape, prefix, posemb_old_size, posemb_method,
                                posemb_antialias)
        report.resampled.append(f"{name} {tuple(source[name].shape)} -> {shape}")
      elif REL_POS_TABLE.search(name) and value.ndim == len(shape):
        value = resize_table(value, shape)
        report.resampled.append(f"{name} {tuple(source[name].shape)} -> {shape}")
      elif reinit_re and reinit_re.search(name):
        report.reinitialised.append(f"{name} {tuple(value.shape)} -> {shape}")
        out[name] = fresh[name]
        continue
      if value.shape != shape:
        mismatched.append(f"{name}: checkpoint {tuple(source[name].shape)}, model {shape}")
        out[name] = fresh[name]
        continue
    out[name] = value.astype(abstract.dtype)
    report.loaded.append(name)
  report.missing, report.mismatched = missing, mismatched
  report.unexpected = sorted(set(source) - set(target))
  if (missing or mismatched or report.unexpected) and not allow_partial:
    raise LoadError(
        f"{report.source} does not fit this model ("
        f"{checkpoint.describe_mismatch(missing, report.unexpected, mismatched, limit=20)})."
        " Is it the same architecture? Parameters matching the reinit pattern "
        f"({reinit!r}) are re-initialised, position embeddings and relative position "
        "tables resampled; for anything else pass allow_partial=True "
        "(config.init_allow_partial) to load what fits, knowingly.")
  return out
