"""Weights of the official implementations of families that timm does not have.

Same contract as ``convert.from_timm``: each family registers
``@register_official_converter(family)``, a function ``(state: StateDict, model) ->
params`` that reads the official repository's parameter names; the result is checked
name by name and shape by shape, and unused entries are reported as unexpected.

  params = official.from_official("pvt_small", "pvt_small.pth")        # whai362/PVT
  params = official.from_official("cswin_tiny_224", "cswin_tiny_224.pth")
"""

import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp

from vit_jax.models import convert
from vit_jax.models.registry import create, model_info

_OFFICIAL_CONVERTERS: dict[str, Callable[[convert.StateDict, Any], dict]] = {}


def register_official_converter(family: str):
  def decorator(fn):
    _OFFICIAL_CONVERTERS[family] = fn
    return fn
  return decorator


def from_official(model_name: str,
                  state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
                  strict: bool = True, model: Optional[Any] = None, **overrides) -> dict:
  """Converts an official checkpoint (mapping or ``.pth``/``.safetensors`` file).

  ``overrides`` go to ``create`` unless ``model`` is given. With ``strict`` (the
  default) a missing, unexpected or mis-shaped key raises ``ConversionError`` naming it.
  """
  if not isinstance(state_dict, Mapping):
    state_dict = convert.load_state_dict(state_dict)
  info = model_info(model_name)
  if info.family not in _OFFICIAL_CONVERTERS:
    raise convert.ConversionError(
        f"no official-checkpoint converter for the {info.family!r} family")
  model = model if model is not None else create(model_name, **overrides)
  state = convert.StateDict(state_dict)
  params = _OFFICIAL_CONVERTERS[info.family](state, model)
  size = getattr(model, "image_size", info.image_size)
  size = (size, size) if isinstance(size, int) else tuple(size)
  expected = convert.abstract_params(model, (1,) + size + (3,))
  convert.check_against(params, expected, state.unused(), strict=strict,
                        what=f"official weights for {model_name}")
  return jax.tree.map(jnp.asarray, params)
