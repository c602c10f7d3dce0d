"""Reading a training run's workdir: its checkpoints, and the model it trained.

A workdir (``--workdir``) holds ``checkpoints/<step>/`` (Orbax, ``checkpoint.py``),
``config.json`` and ``results.json``; a contrastive run adds ``MODEL_FILE`` (the
registered model name and settings) and a copy of its tokenizer (``TOKENIZER_FILE``),
so that the workdir alone rebuilds the model (``load_trained``).
"""

import dataclasses
import json
import os
from typing import Any, Optional, Union

import jax
from etils import epath

from vit_jax import checkpoint, models

MODEL_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.json"

PathLike = Union[str, os.PathLike]


def step_dir(path: PathLike, step: Optional[int] = None) -> epath.Path:
  """The checkpoint step directory ``path`` names; FileNotFoundError if there is none.

  ``path`` is a step directory, or a workdir or its ``checkpoints`` directory, whose
  latest step (or ``step``) is taken.
  """
  path = checkpoint.absolute(path)  # Orbax reads absolute paths only
  if (path / "state").exists():
    return path
  if step is None:
    return checkpoint.latest_step_dir(str(path))
  found = (path / "checkpoints" if (path / "checkpoints").exists() else path) / str(step)
  if not found.exists():
    raise FileNotFoundError(f"no checkpoint of step {step} under {path}")
  return found


def read_variables(path: PathLike, step: Optional[int] = None,
                   sharding: Optional[jax.sharding.Sharding] = None
                   ) -> tuple[dict, epath.Path]:
  """``({"params": ..., <collection>: ...}, step directory)`` of a checkpoint.

  Whatever mesh wrote it, every array is assembled whole on ``sharding`` (default:
  the first local device). Raises FileNotFoundError or ``checkpoint.CheckpointError``.
  """
  directory = step_dir(path, step)
  state = checkpoint.load_state_arrays(str(directory), sharding)
  return {"params": state.get("params", {}), **(state.get("model_state") or {})}, directory


@dataclasses.dataclass
class Trained:
  """A trained two-tower model loaded from a workdir (see ``load_trained``)."""
  model: Any
  variables: dict
  tokenizer: Any  # vit_jax.data.tokenizer.Tokenizer
  pp_eval: str
  step: int
  info: dict


def load_trained(workdir: PathLike, step: Optional[int] = None) -> Trained:
  """Rebuilds the model, tokenizer and parameters of a contrastive training workdir."""
  # Here, not at the top: vit_jax.data imports TensorFlow, which must stay out of a
  # process that reads PyTorch weights (vit_jax.weights reads workdirs through here).
  from vit_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  workdir = checkpoint.absolute(workdir)
  info_path = workdir / MODEL_FILE
  if not info_path.exists():
    raise FileNotFoundError(f"{workdir} is not a contrastive training workdir (no "
                            f"{MODEL_FILE})")
  info = json.loads(info_path.read_text())
  model = models.create(info["model_name"], **info["model"])
  tokenizer = Tokenizer.load(str(workdir / TOKENIZER_FILE),
                             context_length=info["context_length"])
  variables, directory = read_variables(workdir, step)
  return Trained(model, variables, tokenizer, info["pp_eval"], int(directory.name), info)
