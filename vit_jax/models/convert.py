"""Bringing foreign weights into vit_jax parameters, with missing/unexpected keys named.

Each family registers ``@register_timm_converter(family)``, a function
``(state: StateDict, model) -> params`` that reads timm's names through ``state``
(or ``-> Variables({"params": ..., "batch_stats": ...})`` for models that keep
BatchNorm statistics).
``StateDict`` remembers which entries were read, so that whatever the converter did
not use is reported as unexpected, and the result is checked name by name and shape
by shape against the model's own parameters before anything is returned.

  params = convert.from_timm("vit_base_patch16_224", "vit_b16.safetensors")
  variables = convert.variables_from_timm("efficientvit_b0", "b0.safetensors")
"""

import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint
from vit_jax.models.registry import create, model_info


class ConversionError(ValueError):
  """Weights do not fit the model; the message names the keys."""


class StateDict:
  """A read-tracking view of a PyTorch-style ``{name: array}`` mapping."""

  def __init__(self, entries: Mapping[str, Any]):
    self._entries = {k: np.asarray(v) for k, v in entries.items()}
    self._used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def keys(self):
    return self._entries.keys()

  def take(self, key: str) -> np.ndarray:
    if key not in self._entries:
      raise ConversionError(f"the state dict has no entry {key!r}")
    self._used.add(key)
    return self._entries[key]

  def skip(self, predicate: Callable[[str], bool]) -> None:
    """Marks entries that carry no parameters (buffers we recompute) as used."""
    self._used.update(k for k in self._entries if predicate(k))

  def unused(self) -> list[str]:
    return sorted(set(self._entries) - self._used)

  # Layouts: torch Linear is [out, in], Flax Dense [in, out]; torch conv OIHW, Flax HWIO.
  def linear(self, prefix: str, bias: bool = True) -> dict:
    out = {"kernel": self.take(f"{prefix}.weight").T}
    if bias:
      out["bias"] = self.take(f"{prefix}.bias")
    return out

  def conv(self, prefix: str, bias: bool = True) -> dict:
    out = {"kernel": self.take(f"{prefix}.weight").transpose(2, 3, 1, 0)}
    if bias:
      out["bias"] = self.take(f"{prefix}.bias")
    return out

  def norm(self, prefix: str) -> dict:
    return {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}


class Variables(dict):
  """A converter's result holding several variable collections by name.

  Returned by converters of models with non-parameter state (BatchNorm's
  ``batch_stats``); a plain dict returned by a converter is the ``params`` alone.
  """


_TIMM_CONVERTERS: dict[str, Callable[[StateDict, Any], Union[dict, Variables]]] = {}


def register_timm_converter(family: str):
  def decorator(fn):
    _TIMM_CONVERTERS[family] = fn
    return fn
  return decorator


def load_state_dict(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file (no code runs) or a ``.pth``/``.bin`` file.

  ``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses
  anything but tensors: arbitrary pickled objects are never executed.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no weights file at {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"cannot read {path} as safetensors ({e}); is it truncated?"
                            ) from e
  import torch  # pylint: disable=g-import-not-at-top
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"cannot read {path} as a PyTorch state dict ({e})") from e
  for key in ("state_dict", "model", "model_ema"):
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
      state = state[key]
      break
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def abstract_params(model, image_shape) -> Any:
  return abstract_variables(model, image_shape)["params"]


def abstract_variables(model, image_shape) -> dict:
  """Shapes of every variable collection the model keeps (not ``intermediates``)."""
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  return {k: v for k, v in variables.items() if k != "intermediates"}


def check_against(params: Mapping[str, Any], expected: Mapping[str, Any],
                  unused: list[str], *, strict: bool = True, what: str = "weights") -> None:
  missing, unexpected, mismatched = checkpoint.compare_trees(expected, params)
  problems = checkpoint.describe_mismatch(missing, unexpected + unused, mismatched)
  if problems and strict:
    raise ConversionError(f"{what} do not fit the model: {problems}")


def variables_from_timm(model_name: str,
                        state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
                        strict: bool = True, model: Optional[Any] = None,
                        **overrides) -> dict:
  """Converts a timm state dict into every variable collection of ``model_name``.

  Returns ``{"params": ..., "batch_stats": ...}`` (whatever collections the model
  keeps), checked name by name and shape by shape like ``from_timm``.
  """
  if not isinstance(state_dict, Mapping):
    state_dict = load_state_dict(state_dict)
  info = model_info(model_name)
  if info.family not in _TIMM_CONVERTERS:
    raise ConversionError(f"no timm converter for the {info.family!r} family")
  model = model if model is not None else create(model_name, **overrides)
  state = StateDict(state_dict)
  result = _TIMM_CONVERTERS[info.family](state, model)
  variables = dict(result) if isinstance(result, Variables) else {"params": result}
  size = getattr(model, "image_size", info.image_size)
  size = (size, size) if isinstance(size, int) else tuple(size)
  expected = abstract_variables(model, (1,) + size + (3,))
  if set(expected) == set(variables) == {"params"}:  # name params as before: head/bias
    check_against(variables["params"], expected["params"], state.unused(),
                  strict=strict, what=f"timm weights for {model_name}")
  else:  # params/..., batch_stats/...
    check_against(variables, expected, state.unused(), strict=strict,
                  what=f"timm weights for {model_name}")
  return jax.tree.map(jnp.asarray, variables)


def from_timm(model_name: str, state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
              strict: bool = True, model: Optional[Any] = None, **overrides) -> dict:
  """Converts a timm state dict (mapping or file) into params for ``model_name``.

  Args:
    model_name: a registered name; ``overrides`` are passed to ``create`` (e.g.
      ``num_classes``) unless ``model`` is given directly.
    strict: raise ConversionError naming every missing, unexpected or
      shape-mismatched key (the default); with False, convert what fits.

  Models with BatchNorm statistics need ``variables_from_timm`` (params alone
  would lose the statistics); asking this function for them is an error.
  """
  variables = variables_from_timm(model_name, state_dict, strict=strict, model=model,
                                  **overrides)
  others = sorted(set(variables) - {"params"})
  if others:
    raise ConversionError(f"{model_name} also keeps {', '.join(others)}: use "
                          "convert.variables_from_timm to get every collection")
  return variables["params"]
