"""Pretrained weights by model name and tag, downloaded from the Hugging Face Hub.

  from vit_jax.weights import pretrained
  model = pretrained.create("swin_tiny_patch4_window7_224")  # the default tag, bound
  logits = model(images, train=False)          # images preprocessed by info.pp_eval
  module, variables = model.unbind()           # for training: plain module + variables
  variables = pretrained.load_pretrained("vit_base_patch16_224",
                                         "augreg2_in21k_ft_in1k", num_classes=10)
  info = pretrained.pretrained_info("vit_base_patch16_224")  # repo, data config
  info.pp_eval  # "decode|resize_small(248, ...)|central_crop(224, ...)|normalize(...)"
  pretrained.list_pretrained("swin_*")  # ["swin_base_patch4_window12_384.ms_in1k", ...]

A model name may carry its tag as timm's do (``"vit_base_patch16_224.augreg_in1k"``).
This lives above ``vit_jax.models`` (it converts into them); ``models.create(name,
pretrained=True | "tag")``, ``models.load_pretrained`` and ``models.list_pretrained``
call into it, importing it only when called (no import loop).

``pretrained_table.TABLE`` (generated from timm's and open_clip's pretrained configs
by ``python -m vit_jax.tools.pretrained_table``) lists each model's tags, the first
its default: timm's Hub repositories for every family with a timm converter, and
open_clip's for the two-tower models. Files come through the ``hf-hub:`` scheme
(``files.hf_hub_file``: the Hub's cache, ``HF_HUB_OFFLINE``) and convert with the
family's registered converter (``weights.load``) or ``two_tower.from_open_clip``.
"""

import dataclasses
import fnmatch
import logging
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from vit_jax import weights
from vit_jax.models import convert, registry, two_tower
from vit_jax.weights import files
from vit_jax.weights.files import LoadError
from vit_jax.weights.pretrained_table import TABLE

# timm's order when a tag names no file (``load_state_dict_from_hf``).
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One tag of a model: where its weights are and how its inputs were preprocessed."""
  model: str
  tag: str
  hub: str  # the Hub repository
  size: int  # input height = width
  crop_pct: float  # the eval crop's fraction of the resized short side
  interpolation: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int  # of the checkpoint's head (0: none, two-tower models)
  files: tuple[str, ...] = TIMM_FILES  # the weights file: the first the repo holds

  @property
  def source(self) -> str:
    return f"hf-hub:{self.hub}"

  @property
  def pp_eval(self) -> str:
    """The eval preprocessing as our pp string: timm's ``create_transform`` (resize
    the short side to ``size / crop_pct``, central crop, normalise), torchvision-exact."""
    scale = math.floor(self.size / self.crop_pct)
    return (f"decode|resize_small({scale}, method={self.interpolation!r}, "
            f"torchvision=True)|central_crop({self.size}, torchvision=True)|"
            f"normalize({tuple(self.mean)}, {tuple(self.std)})")


def list_pretrained(pattern: str = "*") -> list[str]:
  """``name.tag`` of every pretrained tag matching a shell-style pattern (timm's form)."""
  return [name for name in TABLE if fnmatch.fnmatch(name, pattern)]


def _tags(model: str) -> list[str]:
  return [name.split(".", 1)[1] for name in TABLE if name.split(".", 1)[0] == model]


def pretrained_info(name: str, tag: Optional[str] = None) -> Pretrained:
  """The entry of ``name`` (or ``name.tag``) and ``tag``; its default tag without one."""
  if "." in name:
    name, name_tag = name.split(".", 1)
    if tag is not None and tag != name_tag:
      raise ValueError(f"two tags for {name}: {name_tag!r} (in the name) and {tag!r}")
    tag = name_tag
  registry.model_info(name)  # unknown names: an error with close matches
  tags = _tags(name)
  if not tags:
    raise ValueError(f"{name} has no pretrained weights in vit_jax's table (see "
                     "vit_jax.weights.pretrained.list_pretrained()); load a file with "
                     "vit_jax.weights.load instead")
  tag = tags[0] if tag is None else tag
  if tag not in tags:
    raise ValueError(f"{name} has no pretrained tag {tag!r}; its tags: "
                     f"{', '.join(tags)} (default {tags[0]})")
  return Pretrained(model=name, tag=tag, **TABLE[f"{name}.{tag}"])


def load(name: str, tag: Optional[str] = None, *, seed: int = 0,
         **overrides) -> tuple[Any, dict]:
  """``(model, variables)`` of a pretrained tag (downloaded on first use).

  ``overrides`` go to ``models.create``; the model gets the checkpoint's class count
  unless ``num_classes`` is given, in which case the head is freshly initialised
  from ``seed``.
  """
  info = pretrained_info(name, tag)
  path = files.hf_hub_file(info.hub, info.files)
  if registry.model_info(info.model).family == "two_tower":
    try:
      model, params = two_tower.from_open_clip(path, info.model, **overrides)
    except convert.ConversionError as e:
      raise LoadError(f"{info.source} ({path}) does not fit {info.model}: {e}") from e
    return model, {"params": params}
  fields = {f.name for f in dataclasses.fields(registry.create(info.model))}
  defaults = {"num_classes": info.num_classes}
  if info.size != registry.model_info(info.model).image_size and "image_size" in fields:
    defaults["image_size"] = info.size
  model = registry.create(info.model, **{**defaults, **overrides})
  size = getattr(model, "image_size", info.size)
  height, width = (size, size) if isinstance(size, int) else size
  init = lambda key: model.init(key, jnp.zeros((1, height, width, 3)), train=False)
  # Shapes suffice unless a new head needs fresh values (initialising costs more
  # than converting).
  new_head = overrides.get("num_classes", info.num_classes) != info.num_classes
  key = jax.random.key(seed)
  fresh = jax.jit(init)(key) if new_head else jax.eval_shape(init, key)
  variables, report = weights.load(path, model, fresh, model_name=info.model)
  logging.info("%s.%s: %s", info.model, info.tag, report.summary())
  return model, variables


def load_pretrained(name: str, tag: Optional[str] = None, *, seed: int = 0,
                    **overrides) -> dict:
  """The variables of a pretrained tag (``load`` without the model)."""
  return load(name, tag, seed=seed, **overrides)[1]


def create(name: str, tag: Optional[str] = None, *, seed: int = 0, **overrides):
  """The model bound to a pretrained tag's variables (``model.unbind()`` splits them).

  timm's ``create_model(name, pretrained=True)``; ``overrides`` as in ``load``.
  """
  model, variables = load(name, tag, seed=seed, **overrides)
  return model.bind(variables)
