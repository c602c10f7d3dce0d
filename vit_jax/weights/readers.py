"""Readers: a weights source -> flat arrays under our parameter names, by format.

A directory is one of our Orbax checkpoints; a file is read by its suffix
(``READERS``). Each reader returns ``({"/"-joined name: array}, format)``, with
non-parameter collections as ``<collection>:<name>``:

* Orbax: a workdir, its ``checkpoints`` directory or one step directory (the latest
  step); parameters and collections such as ``batch_stats``. An MAE workdir gives
  its encoder under the ViT's names (the decoder dropped, named in the format);
* ``.npz``: the vision_transformer layout (``Transformer/encoderblock_0/...``,
  optionally under ``opt/target/`` or ``params/``) or big_vision's ViT layout
  (``pos_embedding``, ``MultiHeadDotProductAttention_0``, ...), renamed to ours;
* ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``: a timm state dict through the model
  family's registered converter (``vit_jax.models.convert``), at the checkpoint's own
  class count; entries the converter left unread come back as ``timm:<key>`` (so
  they are reported as unexpected). An open_clip checkpoint gives its image tower,
  converted by the registered two-tower model with that tower
  (``two_tower.from_open_clip``), e.g. into ``vit_base_patch32_clip_224``.
"""

import re
from typing import Any, Callable, Mapping, Optional

import numpy as np
from etils import epath

from vit_jax import checkpoint, tree, workdir
from vit_jax.models import convert, mae, registry, two_tower
from vit_jax.weights import files
from vit_jax.weights.files import LoadError

# (path, model, registered model name) -> (flat arrays, format)
Reader = Callable[[str, Any, Optional[str]], tuple[dict[str, np.ndarray], str]]


def _flat(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{"params": p, "batch_stats": s}`` -> ``{name: ..., "batch_stats:name": ...}``."""
  flat = {}
  for collection, value in variables.items():
    prefix = "" if collection == "params" else f"{collection}:"
    flat.update({prefix + k: np.asarray(v) for k, v in tree.flatten(value).items()})
  return flat


def read_orbax(path: str, model: Any = None, model_name: Optional[str] = None
               ) -> tuple[dict[str, np.ndarray], str]:
  del model, model_name  # our own names
  try:
    variables, _ = workdir.read_variables(path)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    raise LoadError(f"{path} is not a readable vit_jax checkpoint: {e}") from e
  flat = _flat(variables)
  pretrained = mae.encoder_params(flat)
  if pretrained is not None:  # an MAE run: its encoder is the ViT; the decoder goes
    flat, dropped = pretrained
    parts = sorted({name.split("/")[0] for name in dropped})
    return flat, (f"vit_jax MAE checkpoint: encoder kept, decoder dropped "
                  f"({len(dropped)} arrays under {', '.join(parts)})")
  return flat, "vit_jax orbax checkpoint"


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


def read_npz(path: str, model: Any = None, model_name: Optional[str] = None
             ) -> tuple[dict[str, np.ndarray], str]:
  del model, model_name  # the ViT layouts carry their names
  flat = files.read_npz(path)
  for prefix in ("opt/target/", "params/"):
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      break
  return _from_big_vision(flat), "npz"


def _open_clip_image_tower(state_dict: dict, path: str, model_name: str
                           ) -> dict[str, np.ndarray]:
  """The image tower of an open_clip CLIP checkpoint, for the registered tower model.

  The two-tower model whose image tower is ``model_name`` converts the whole state
  dict (every key checked); its text tower and projections are not part of an image
  model.
  """
  towers = [name for name in registry.list_models(family="two_tower")
            if registry.create(name).image_model == model_name]
  if not towers:
    image_models = sorted({registry.create(n).image_model
                           for n in registry.list_models(family="two_tower")})
    raise LoadError(f"{path} is an open_clip checkpoint; its image tower loads into "
                    f"one of {image_models}, not {model_name!r}")
  try:
    _, params = two_tower.from_open_clip(state_dict, towers[0])
  except convert.ConversionError as e:
    raise LoadError(f"{path} does not fit {towers[0]}: {e}") from e
  return _flat({"params": params["img"]})


def read_state_dict(path: str, model: Any = None, model_name: Optional[str] = None
                    ) -> tuple[dict[str, np.ndarray], str]:
  if model is None or model_name is None:
    raise ValueError("reading timm weights needs the model and its registered name")
  state_dict = files.read_state_dict(path)
  if "token_embedding.weight" in state_dict and any(k.startswith("visual.")
                                                     for k in state_dict):
    return (_open_clip_image_tower(state_dict, path, model_name),
            "open_clip state dict (image tower)")
  # The class count: the last matrix of the head (head.weight, head.fc.weight,
  # EfficientViT-M's head.linear after its BatchNorm, an MLP head's fc2, ...).
  head = [k for k in state_dict if re.match(r"head\.(.+\.)?weight$", k)
          and np.ndim(state_dict[k]) == 2]
  num_classes = int(np.shape(state_dict[head[-1]])[0]) if head else 0
  source_model = model.clone(num_classes=num_classes) if hasattr(
      model, "num_classes") else model
  family = registry.model_info(model_name).family
  try:
    variables, unused = convert.run_converter("timm", family, state_dict, source_model)
  except convert.ConversionError as e:
    raise LoadError(f"{path} does not fit {model_name}: {e}") from e
  flat = _flat(variables)
  flat.update({f"timm:{k}": np.asarray(state_dict[k]) for k in unused})
  return flat, "timm state dict"


# File suffix -> reader; a directory is read by read_orbax.
READERS: dict[str, Reader] = {".npz": read_npz,
                              **{s: read_state_dict for s in files.STATE_DICT_SUFFIXES}}


def read(source: files.Source, model: Any = None, model_name: Optional[str] = None
         ) -> tuple[dict[str, np.ndarray], str]:
  """Any supported source as flat ``/``-joined names; returns (arrays, format)."""
  path = files.local_path(source)
  if epath.Path(path).is_dir():  # local, or a remote Orbax checkpoint
    return read_orbax(path, model, model_name)
  for suffix, reader in READERS.items():
    if path.endswith(suffix):
      return reader(path, model, model_name)
  raise LoadError(f"unknown weights format: {path} (expected an Orbax checkpoint "
                  f"directory or a file ending in {', '.join(READERS)})")
