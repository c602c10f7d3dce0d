"""Weight files: where they come from, and how each kind parses into arrays.

Nothing here knows a parameter name (``readers.py`` maps names onto a model):

* ``SCHEMES``: a source prefix -> a function giving a local path for the rest of the
  source. Remote sources (a Hub repository, a bucket) register a fetcher here
  (``register_scheme("hf-hub:", download)``) and every reader takes them.
* ``read_state_dict``: a PyTorch-style state dict from ``.safetensors`` (no code
  runs) or ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``, which
  refuses anything but tensors: pickled objects are never executed.
* ``read_npz``: the arrays of an ``.npz`` (``allow_pickle=False``).
"""

import os
from typing import Callable, Union

import numpy as np

Source = Union[str, os.PathLike]
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Checkpoints that wrap the state dict: the first of these keys holding a dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_ema")


class LoadError(ValueError):
  """Weights cannot be read, or do not fit the model; the message names the keys."""


SCHEMES: dict[str, Callable[[str], str]] = {"file://": lambda rest: rest}


def register_scheme(prefix: str, fetch: Callable[[str], str]) -> None:
  """Sources starting with ``prefix`` are read from ``fetch(rest_of_source)``."""
  SCHEMES[prefix] = fetch


def local_path(source: Source) -> str:
  """The local file or directory a source names; FileNotFoundError if there is none."""
  source = os.fspath(source)
  for prefix, fetch in SCHEMES.items():
    if source.startswith(prefix):
      source = fetch(source[len(prefix):])
      break
  if not os.path.exists(source):
    raise FileNotFoundError(f"no weights at {source}")
  return source


def read_state_dict(source: Source) -> dict[str, np.ndarray]:
  """``{name: array}`` of a ``.safetensors`` or PyTorch weights file."""
  path = local_path(source)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise LoadError(f"cannot read {path} as safetensors ({e}); is it truncated?") from e
  import torch  # pylint: disable=g-import-not-at-top
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f"cannot read {path} as a PyTorch state dict ({e})") from e
  for key in _STATE_DICT_KEYS:
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  if not isinstance(state, dict):
    raise LoadError(f"{path} holds a {type(state).__name__}, not a mapping of parameter "
                    "names to tensors")
  others = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
            if not isinstance(v, torch.Tensor)]
  if others:
    raise LoadError(
        f"{path} is not a flat mapping of parameter names to tensors (not tensors: "
        f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}). Save the model's state_dict(), or nest it under one of "
        f"{', '.join(map(repr, _STATE_DICT_KEYS))}")
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def read_npz(source: Source) -> dict[str, np.ndarray]:
  path = local_path(source)
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); is it "
                    "truncated?") from e
