"""Weight files: where they come from, and how each kind parses into arrays.

Nothing here knows a parameter name (``readers.py`` maps names onto a model):

* ``SCHEMES``: a source prefix -> a function giving a local path for the rest of the
  source; every reader takes what a scheme gives. ``hf-hub:ORG/REPO[@revision][/file]``
  downloads through ``huggingface_hub`` into the Hub's own cache (``HF_HOME``,
  ``HF_HUB_CACHE``) and honours ``HF_HUB_OFFLINE=1``; without ``/file`` the repository's
  weights file is the first of ``HUB_WEIGHTS_FILES`` it holds. Other remote sources
  register a fetcher (``register_scheme(prefix, fetch)``). A URI that etils.epath
  reads (``gs://``, ``s3://``) is copied once into ``REMOTE_CACHE`` (the readers,
  ``torch.load`` and safetensors read local files); an Orbax checkpoint directory
  there is left where it is (Orbax reads gs:// itself).
* ``read_state_dict``: a PyTorch-style state dict from ``.safetensors`` (no code
  runs) or ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``, which
  refuses anything but tensors: pickled objects are never executed.
* ``read_npz``: the arrays of an ``.npz`` (``allow_pickle=False``).
"""

import hashlib
import os
import shutil
import uuid
from typing import Callable, Optional, Sequence, Union

import numpy as np
from etils import epath

Source = Union[str, os.PathLike]
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Checkpoints that wrap the state dict: the first of these keys holding a dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_ema")


class LoadError(ValueError):
  """Weights cannot be read, or do not fit the model; the message names the keys."""


# What a Hub repository's weights file is called, in the order we look: timm's, then
# open_clip's; safetensors (no code runs) before PyTorch's pickles.
HUB_WEIGHTS_FILES = ("model.safetensors", "open_clip_model.safetensors",
                     "pytorch_model.bin", "open_clip_pytorch_model.bin")


def parse_hf_hub(spec: str) -> tuple[str, Optional[str], Optional[str]]:
  """``ORG/REPO[@revision][/file]`` -> ``(repo_id, revision, filename)``."""
  parts = spec.split("/", 2)
  if len(parts) < 2 or not parts[0] or not parts[1] or (len(parts) == 3 and not parts[2]):
    raise LoadError(f"hf-hub:{spec} is not a Hub source; expected "
                    "hf-hub:ORG/REPO[@revision][/file], e.g. "
                    "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
  repo, _, revision = parts[1].partition("@")
  return f"{parts[0]}/{repo}", revision or None, parts[2] if len(parts) == 3 else None


def hf_hub_file(spec: str, names: Sequence[str] = HUB_WEIGHTS_FILES) -> str:
  """The local copy of a Hub file (``parse_hf_hub``), downloaded into the Hub's cache.

  Without a file in ``spec``, the first of ``names`` that the repository holds.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants, errors  # pylint: disable=g-import-not-at-top
  repo_id, revision, filename = parse_hf_hub(spec)
  names = (filename,) if filename else tuple(names)
  for name in names:  # a cached candidate wins without asking the Hub
    cached = huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision)
    if isinstance(cached, str):
      return cached
  offline = constants.HF_HUB_OFFLINE
  where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
  if not offline:
    for name in names:
      try:
        return huggingface_hub.hf_hub_download(repo_id, name, revision=revision,
                                               library_name="vit_jax")
      except errors.LocalEntryNotFoundError as e:  # unreachable; an EntryNotFoundError too
        raise LoadError(f"cannot reach the Hub for {where} and its cache "
                        f"({constants.HF_HUB_CACHE}) has no "
                        f"{' or '.join(names)}: {e}") from e
      except errors.EntryNotFoundError:
        continue  # the repository has no such file: try the next name
      except errors.RepositoryNotFoundError as e:
        raise LoadError(f"no Hub repository {repo_id} (or it is private and no token is "
                        "set: huggingface-cli login)") from e
      except errors.RevisionNotFoundError as e:
        raise LoadError(f"the Hub repository {repo_id} has no revision {revision}") from e
    raise LoadError(f"the Hub repository {where} has no {' or '.join(names)}; name the "
                    f"file: hf-hub:{repo_id}/FILE")
  raise LoadError(f"HF_HUB_OFFLINE is set and the Hub cache "
                  f"({constants.HF_HUB_CACHE}) has no {' or '.join(names)} "
                  f"of {where}; download it once with the network on (unset "
                  "HF_HUB_OFFLINE) or copy the cache here")


SCHEMES: dict[str, Callable[[str], str]] = {"file://": lambda rest: rest,
                                            "hf-hub:": hf_hub_file}


def register_scheme(prefix: str, fetch: Callable[[str], str]) -> None:
  """Sources starting with ``prefix`` are read from ``fetch(rest_of_source)``."""
  SCHEMES[prefix] = fetch


# Where remote weight files are copied (one folder per URI, so names never clash).
REMOTE_CACHE = os.environ.get(
    "VIT_JAX_REMOTE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vit_jax",
                                         "remote"))


def fetch_remote(uri: str) -> str:
  """A local copy of the remote file ``uri`` (copied once; a copy whose size differs
  from the remote file's is fetched again), or ``uri`` itself for a directory."""
  remote = epath.Path(uri)
  if not remote.exists():
    raise FileNotFoundError(f"no weights at {uri}")
  if remote.is_dir():
    return uri
  folder = os.path.join(REMOTE_CACHE, hashlib.sha256(uri.encode()).hexdigest()[:16])
  local = os.path.join(folder, remote.name)
  size = remote.stat().length
  if not os.path.exists(local) or (size is not None and os.path.getsize(local) != size):
    os.makedirs(folder, exist_ok=True)
    partial = f"{local}.{uuid.uuid4().hex[:8]}.partial"  # a killed copy is never used
    try:
      with remote.open("rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
      os.replace(partial, local)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  return local


def local_path(source: Source) -> str:
  """The local file or directory a source names; FileNotFoundError if there is none.
  Remote URIs (gs://...) go through ``fetch_remote``."""
  source = os.fspath(source)
  for prefix, fetch in SCHEMES.items():
    if source.startswith(prefix):
      source = fetch(source[len(prefix):])
      break
  if "://" in source:
    return fetch_remote(source)
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
