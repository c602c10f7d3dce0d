"""Model registry: timm-style names -> factories of Flax modules.

Every family file registers its variants at import with ``@register_model``;
``vit_jax.models`` imports the family files, so ``create`` and ``list_models`` see all.
"""

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  family: str
  image_size: int  # default (pretraining) resolution of the variant
  factory: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelInfo] = {}
# Settings some families offer, with why a family without them cannot: see create.
_SETTING_SCOPES: dict[str, str] = {}


def explain_setting(names, why: str) -> None:
  """Makes ``create`` answer a family lacking the settings ``names`` with ``why``."""
  for name in names:
    _SETTING_SCOPES[name] = why


def register_model(name: str, *, family: str, image_size: int = 224):
  """Decorator registering ``factory(**overrides) -> nn.Module`` under ``name``."""
  def decorator(factory):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelInfo(name, family, image_size, factory)
    return factory
  return decorator


def register_variant(name: str, module: Callable[..., nn.Module], defaults: Mapping[str, Any],
                     *, family: str, image_size: int = 224, doc: str = "") -> None:
  """Registers ``name`` as ``module(**defaults)``, each default overridable in ``create``."""
  def factory(**overrides):
    return module(**{**defaults, **overrides})

  factory.__doc__ = doc
  register_model(name, family=family, image_size=image_size)(factory)


def list_models(pattern: str = "*", family: Optional[str] = None) -> list[str]:
  """Registered names matching a shell-style pattern, e.g. ``"vit_*_patch16_*"``."""
  return sorted(n for n, info in _REGISTRY.items()
                if fnmatch.fnmatch(n, pattern) and (family is None or info.family == family))


def model_info(name: str) -> ModelInfo:
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(f"unknown model {name!r}.{hint} "
                     "See vit_jax.models.list_models() for every registered name.")
  return _REGISTRY[name]


def settings(name: str) -> set[str]:
  """The settings (dataclass fields) a registered model takes."""
  module = model_info(name).factory()
  return {f.name for f in dataclasses.fields(module)} - {"parent", "name"}


def create(name: str, **overrides) -> nn.Module:
  """Creates a registered model, e.g. ``create("vit_base_patch16_224", num_classes=10)``.

  Overrides replace the variant's defaults; an override the model does not take is
  an error that names it.
  """
  info = model_info(name)
  fields = settings(name)
  unknown = sorted(set(overrides) - fields)
  scoped = [key for key in unknown if key in _SETTING_SCOPES]
  if scoped:
    raise ValueError(f"model {name!r} (family {info.family!r}) has no setting "
                     f"{scoped[0]!r}: {_SETTING_SCOPES[scoped[0]]}")
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, fields, n=3)
      hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ValueError(f"model {name!r} has no setting {', '.join(hints)}. "
                     f"Its settings are: {', '.join(sorted(fields))}.")
  return info.factory(**overrides)
