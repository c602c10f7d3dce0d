"""Converters of foreign state dicts into vit_jax variables, with missing/unexpected keys named.

A family registers one converter per source layout beside its model:
``@register_timm_converter(family)`` for timm's names, ``@register_official_converter``
for the official repository's where timm lacks the family. A converter is a function
``(state: StateDict, model) -> params`` that reads the source's names through
``state`` (or ``-> Variables({"params": ..., "batch_stats": ...})`` for models that
keep BatchNorm statistics). ``StateDict`` remembers which entries were read, so that
whatever the converter did not use is reported as unexpected, and the result is
checked name by name and shape by shape against the model's own variables before
anything is returned.

  params = convert.from_timm("vit_base_patch16_224", "vit_b16.safetensors")
  variables = convert.variables_from_timm("efficientvit_b0", "b0.safetensors")
  params = convert.from_official("pvt_small", "pvt_small.pth")        # whai362/PVT

Files are read by ``vit_jax.weights.files``; ``vit_jax.weights.load`` is the loader
that also adapts a checkpoint to another head, resolution or block layout.
"""

import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint
from vit_jax.models.registry import create, model_info

Converter = Callable[["StateDict", Any], Union[dict, "Variables"]]
# Source layout -> how an error names it.
SOURCES = {"timm": "timm", "official": "official-checkpoint"}


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


_CONVERTERS: dict[tuple[str, str], Converter] = {}


def register_converter(source: str, family: str):
  """Decorator registering a family's converter from the ``source`` layout."""
  if source not in SOURCES:
    raise ValueError(f"unknown weights source {source!r}; one of {sorted(SOURCES)}")

  def decorator(fn):
    _CONVERTERS[(source, family)] = fn
    return fn
  return decorator


def register_timm_converter(family: str):
  return register_converter("timm", family)


def register_official_converter(family: str):
  return register_converter("official", family)


def families_with(source: str) -> list[str]:
  """The families with a registered converter from the ``source`` layout."""
  return sorted(f for s, f in _CONVERTERS if s == source)


def converter(source: str, family: str) -> Converter:
  """The registered converter, or ConversionError naming the families that have one."""
  if (source, family) not in _CONVERTERS:
    have = families_with(source)
    raise ConversionError(f"no {SOURCES.get(source, source)} converter for the {family!r} "
                          f"family (families with one: {', '.join(have)})")
  return _CONVERTERS[(source, family)]


def load_state_dict(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """A ``.safetensors``/``.pth``/``.bin`` file's arrays (``vit_jax.weights.files``)."""
  # At call time: vit_jax.weights converts into the registered models, so it is
  # imported after them, never while the family files register.
  from vit_jax.weights import files  # pylint: disable=g-import-not-at-top
  return files.read_state_dict(path)


def run_converter(source: str, family: str, state_dict: Mapping[str, Any], model: Any
                  ) -> tuple[dict, list[str]]:
  """``(variables by collection, unused state-dict keys)``, nothing checked yet."""
  state = StateDict(state_dict)
  result = converter(source, family)(state, model)
  variables = dict(result) if isinstance(result, Variables) else {"params": result}
  return variables, state.unused()


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


def convert_variables(source: str, model_name: str,
                      state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
                      strict: bool = True, model: Optional[Any] = None,
                      **overrides) -> dict:
  """Every variable collection of ``model_name`` from a ``source``-layout state dict.

  ``state_dict`` is a mapping or a file; ``overrides`` go to ``create`` unless
  ``model`` is given. With ``strict`` (the default) a missing, unexpected or
  mis-shaped key raises ``ConversionError`` naming it; with False, what fits converts.
  """
  if not isinstance(state_dict, Mapping):
    state_dict = load_state_dict(state_dict)
  info = model_info(model_name)
  model = model if model is not None else create(model_name, **overrides)
  variables, unused = run_converter(source, info.family, state_dict, model)
  size = getattr(model, "image_size", info.image_size)
  size = (size, size) if isinstance(size, int) else tuple(size)
  expected = abstract_variables(model, (1,) + size + (3,))
  what = f"{SOURCES[source]} weights for {model_name}"
  if set(expected) == set(variables) == {"params"}:  # names without "params/": head/bias
    check_against(variables["params"], expected["params"], unused, strict=strict,
                  what=what)
  else:  # params/..., batch_stats/...
    check_against(variables, expected, unused, strict=strict, what=what)
  return jax.tree.map(jnp.asarray, variables)


def _params_only(model_name: str, variables: dict, instead: str) -> dict:
  others = sorted(set(variables) - {"params"})
  if others:
    raise ConversionError(f"{model_name} also keeps {', '.join(others)}: use "
                          f"convert.{instead} to get every collection")
  return variables["params"]


def variables_from_timm(model_name: str,
                        state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
                        strict: bool = True, model: Optional[Any] = None,
                        **overrides) -> dict:
  """A timm state dict as ``{"params": ..., "batch_stats": ...}`` (what the model keeps)."""
  return convert_variables("timm", model_name, state_dict, strict=strict, model=model,
                           **overrides)


def from_timm(model_name: str, state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
              strict: bool = True, model: Optional[Any] = None, **overrides) -> dict:
  """A timm state dict (mapping or file) as params for ``model_name``.

  Models with BatchNorm statistics need ``variables_from_timm`` (params alone
  would lose the statistics); asking this function for them is an error.
  """
  variables = variables_from_timm(model_name, state_dict, strict=strict, model=model,
                                  **overrides)
  return _params_only(model_name, variables, "variables_from_timm")


def from_official(model_name: str,
                  state_dict: Union[Mapping[str, Any], str, os.PathLike], *,
                  strict: bool = True, model: Optional[Any] = None, **overrides) -> dict:
  """An official-repository checkpoint (mapping or file) as params for ``model_name``."""
  variables = convert_variables("official", model_name, state_dict, strict=strict,
                                model=model, **overrides)
  return _params_only(model_name, variables, 'convert_variables("official", ...)')
