"""Initialising a model from pretrained weights in any format, with a key report.

  variables, report = init_from.load("ckpt.npz", model, fresh_variables)
  print(report.summary())

Formats (by path):

* an Orbax checkpoint of ours: a workdir, its ``checkpoints`` directory or one step
  directory (the parameters and non-parameter collections such as ``batch_stats``);
* ``.npz`` in the vision_transformer layout (``Transformer/encoderblock_0/...``,
  optionally under ``opt/target/`` or ``params/``) or big_vision's ViT layout
  (``pos_embedding``, ``MultiHeadDotProductAttention_0``, ...), renamed to ours;
* timm ``.safetensors`` / ``.pth`` / ``.bin``, through the model family's registered
  timm converter (``vit_jax.models.convert``).

open_clip checkpoints (``.safetensors``/``.pt``/``.bin``) give their image tower: the
registered two-tower model with that tower converts them
(``vit_jax.models.two_tower.from_open_clip``), e.g. into ``vit_base_patch32_clip_224``.

What is adapted to the target model, and reported:

* parameters matching ``reinit`` (default: the classification head) are taken from
  the fresh initialisation when the checkpoint lacks them or their shape differs
  (a new class count);
* a learned position embedding of another grid is resampled (``resample.py``,
  bicubic with antialias by default, class token kept); a big_vision embedding
  without a class-token slot gets a zero slot (big_vision adds no position to it);
* relative position bias tables of windowed models are resized for a new window;
* ``encoderblock_{i}`` and scanned ``encoderblock`` layouts are converted.

Anything else that does not fit -- a missing, unexpected or shape-mismatched
parameter -- raises ``LoadError`` naming the keys. ``allow_partial=True`` is the
explicit request to load what fits (missing ones from the fresh initialisation,
unexpected ones dropped), and the report lists them all.
"""

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint as ckpt_lib
from vit_jax import tree as tree_lib
from vit_jax.models import convert, registry, resample, vit

DEFAULT_REINIT = r"^head/"
POSEMB = re.compile(r"(^|/)posembed_input/pos_embedding$")
REL_POS_TABLE = re.compile(r"(^|/)relative_position_bias_table$")


class LoadError(ValueError):
  """The checkpoint does not fit the model; the message names the keys."""


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

  def summary(self) -> str:
    parts = [f"loaded {len(self.loaded)} arrays from {self.source} ({self.format})"]
    for title, names in (("new (fresh init)", self.reinitialised),
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


flatten, unflatten = tree_lib.flatten, tree_lib.unflatten


# ------------------------------------------------------------------ readers

def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); is it "
                    "truncated?") from e
  for prefix in ("opt/target/", "params/"):
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      break
  return _from_big_vision(flat)


_BV_BLOCK = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
             "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
             "MlpBlock_0": "MlpBlock_3"}


def _from_big_vision(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision's ViT names -> vision_transformer's (the layout our ViT keeps)."""
  if "pos_embedding" not in flat:
    return flat
  out = {}
  for key, value in flat.items():
    if key == "pos_embedding":
      key = "Transformer/posembed_input/pos_embedding"
    parts = key.split("/")
    if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith(
        "encoderblock"):
      parts[2] = _BV_BLOCK.get(parts[2], parts[2])
    out["/".join(parts)] = value
  return out


def _read_orbax(path: str) -> dict[str, np.ndarray]:
  """Params (and non-param collections, under ``<collection>:``) of our checkpoint."""
  try:
    step_dir = path if os.path.isdir(os.path.join(path, "state")) else str(
        ckpt_lib.latest_step_dir(path))
    state = ckpt_lib.load_state_arrays(step_dir)
  except (FileNotFoundError, ckpt_lib.CheckpointError) as e:
    raise LoadError(f"{path} is not a readable vit_jax checkpoint: {e}") from e
  flat = {k: np.asarray(v) for k, v in flatten(state.get("params", {})).items()}
  for collection, tree in (state.get("model_state") or {}).items():
    flat.update({f"{collection}:{k}": np.asarray(v) for k, v in flatten(tree).items()})
  return flat


def _read_state_dict(path: str, model: Any, model_name: str
                     ) -> tuple[dict[str, np.ndarray], str]:
  """timm weights through the family converter, at the checkpoint's own shapes (or an
  open_clip checkpoint's image tower); returns (arrays, format)."""
  try:
    state_dict = convert.load_state_dict(path)
  except convert.ConversionError as e:
    raise LoadError(str(e)) from e
  if "token_embedding.weight" in state_dict and any(k.startswith("visual.")
                                                     for k in state_dict):
    return (_read_open_clip(state_dict, path, model_name),
            "open_clip state dict (image tower)")
  family = registry.model_info(model_name).family
  head = [k for k in state_dict if re.search(r"(^|\.)head(\.fc)?\.weight$", k)]
  num_classes = int(np.shape(state_dict[head[0]])[0]) if head else 0
  source_model = model.clone(num_classes=num_classes) if hasattr(
      model, "num_classes") else model
  state = convert.StateDict(state_dict)
  try:
    result = convert._TIMM_CONVERTERS[family](state, source_model)  # pylint: disable=protected-access
  except KeyError as e:
    raise LoadError(f"no timm converter for the {family!r} family") from e
  except convert.ConversionError as e:
    raise LoadError(f"{path} does not fit {model_name}: {e}") from e
  unused = state.unused()
  if isinstance(result, convert.Variables):
    flat = {k: np.asarray(v) for k, v in flatten(result.pop("params", {})).items()}
    for collection, tree in result.items():
      flat.update({f"{collection}:{k}": np.asarray(v) for k, v in flatten(tree).items()})
  else:
    flat = {k: np.asarray(v) for k, v in flatten(result).items()}
  flat.update({f"timm:{k}": np.asarray(state_dict[k]) for k in unused})
  return flat, "timm state dict"


def _read_open_clip(state_dict: Mapping[str, Any], path: str,
                    model_name: str) -> dict[str, np.ndarray]:
  """The image tower of an open_clip CLIP checkpoint, for the registered tower model.

  The two-tower model whose image tower is ``model_name`` converts the whole state dict
  (every key checked); its text tower and projections are not part of an image model.
  """
  from vit_jax.models import two_tower  # pylint: disable=g-import-not-at-top
  towers = [name for name in registry.list_models(family="two_tower")
            if registry.create(name).image_model == model_name]
  if not towers:
    image_models = sorted({registry.create(n).image_model
                           for n in registry.list_models(family="two_tower")})
    raise LoadError(f"{path} is an open_clip checkpoint; its image tower loads into "
                    f"one of {image_models}, not {model_name!r}")
  try:
    _, params = two_tower.from_open_clip(dict(state_dict), towers[0])
  except convert.ConversionError as e:
    raise LoadError(f"{path} does not fit {towers[0]}: {e}") from e
  return {k: np.asarray(v) for k, v in flatten(params["img"]).items()}


def read(path: str, model: Any = None, model_name: Optional[str] = None
         ) -> tuple[dict[str, np.ndarray], str]:
  """Reads any supported format into flat ``/``-joined names; returns (arrays, format)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if os.path.isdir(path):
    return _read_orbax(path), "vit_jax orbax checkpoint"
  if path.endswith(".npz"):
    return _read_npz(path), "npz"
  if path.endswith((".safetensors", ".pth", ".pt", ".bin")):
    if model is None or model_name is None:
      raise ValueError("reading timm weights needs the model and its registered name")
    return _read_state_dict(path, model, model_name)
  raise LoadError(f"unknown checkpoint format: {path} (expected an Orbax checkpoint "
                  "directory, .npz, .safetensors, .pth or .bin)")


# ------------------------------------------------------------------ adapting

def _match_block_layout(flat: dict, target: dict) -> dict:
  scanned = lambda names: any("/encoderblock/" in n for n in names)
  if scanned(flat) == scanned(target):
    return flat
  convert_fn = vit.stack_block_params if scanned(target) else vit.unstack_block_params
  return flatten(convert_fn(unflatten(flat)))


def _resample_posemb(value: np.ndarray, target_shape: tuple, prefix: int,
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


def _resize_table(value: np.ndarray, target_shape: tuple) -> np.ndarray:
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
  """Flat source arrays -> flat arrays with exactly the target's names and shapes."""
  source = _match_block_layout(dict(source), target)
  reinit_re = re.compile(reinit) if reinit else None
  prefix = 1 if "cls" in target else 0
  out, problems = {}, {"missing": [], "unexpected": [], "mismatched": []}
  for name, abstract in target.items():
    shape = tuple(abstract.shape)
    if name not in source:
      if reinit_re and reinit_re.search(name):
        report.reinitialised.append(name)
      else:
        problems["missing"].append(name)
      out[name] = fresh[name]
      continue
    value = np.asarray(source[name])
    if value.shape != shape:
      if POSEMB.search(name) and value.ndim == 3:
        value = _resample_posemb(value, shape, prefix, posemb_old_size, posemb_method,
                                 posemb_antialias)
        report.resampled.append(f"{name} {tuple(source[name].shape)} -> {shape}")
      elif REL_POS_TABLE.search(name) and value.ndim == len(shape):
        value = _resize_table(value, shape)
        report.resampled.append(f"{name} {tuple(source[name].shape)} -> {shape}")
      elif reinit_re and reinit_re.search(name):
        report.reinitialised.append(f"{name} {tuple(value.shape)} -> {shape}")
        out[name] = fresh[name]
        continue
      if value.shape != shape:
        problems["mismatched"].append(f"{name}: checkpoint {tuple(source[name].shape)}, "
                                      f"model {shape}")
        out[name] = fresh[name]
        continue
    out[name] = value.astype(abstract.dtype)
    report.loaded.append(name)
  problems["unexpected"] = sorted(set(source) - set(target))
  report.missing, report.unexpected = problems["missing"], problems["unexpected"]
  report.mismatched = problems["mismatched"]
  if any(problems.values()) and not allow_partial:
    raise LoadError(
        f"{report.source} does not fit this model ("
        f"{ckpt_lib.describe_mismatch(*problems.values(), limit=20)}). Is it the same "
        "architecture? Parameters matching the reinit pattern "
        f"({reinit!r}) are re-initialised, position embeddings and relative position "
        "tables resampled; for anything else pass allow_partial=True "
        "(config.init_allow_partial) to load what fits, knowingly.")
  return out


def load(path: str, model: Any, fresh_variables: Mapping[str, Any], *,
         model_name: Optional[str] = None, reinit: str = DEFAULT_REINIT,
         allow_partial: bool = False, posemb_method: str = "bicubic",
         posemb_antialias: bool = True) -> tuple[dict, LoadReport]:
  """Pretrained variables for ``model`` from ``path`` (any supported format).

  Args:
    fresh_variables: the model's freshly initialised variables (``model.init``), the
      source of re-initialised parameters and the reference for names and shapes.
    model_name: the registered name (needed for timm state dicts).
    reinit: regex of parameter names that may be re-initialised when missing or of
      another shape (the head for a new class count).
  Returns:
    (variables with the same collections as ``fresh_variables``, LoadReport)
  """
  source, fmt = read(path, model, model_name)
  report = LoadReport(source=os.fspath(path), format=fmt)
  target = {}
  fresh = {}
  for collection, tree in fresh_variables.items():
    if collection == "intermediates":
      continue
    prefix = "" if collection == "params" else f"{collection}:"
    for k, v in flatten(tree).items():
      target[prefix + k] = jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype)
      fresh[prefix + k] = v
  flat = adapt(source, target, fresh, report, reinit=reinit, allow_partial=allow_partial,
               posemb_method=posemb_method, posemb_antialias=posemb_antialias)
  variables: dict = {}
  for key, value in flat.items():
    collection, name = key.split(":", 1) if ":" in key else ("params", key)
    variables.setdefault(collection, {})[name] = value
  return {c: jax.tree.map(jnp.asarray, unflatten(v)) for c, v in variables.items()}, report
