"""Pretrained weights in any format, fitted to a model, with a report of every key.

  from vit_jax import weights
  variables, report = weights.load("ckpt.npz", model, fresh_variables,
                                   model_name="vit_base_patch16_224")
  print(report.summary())

``load`` is the one entry point (the trainers' ``config.init``, the colabs): it reads
the source (``readers.py``: our Orbax workdirs, ``.npz`` of the vision_transformer and
big_vision layouts, timm ``.safetensors``/``.pth`` through the family's converter,
open_clip image towers) and fits it to the model (``adapt.py``: a new head,
position embeddings and relative position tables resampled, scanned/unscanned
blocks). Where a source comes from is ``files.py``'s scheme table (a path,
``hf-hub:ORG/REPO[@revision][/file]`` through the Hub's cache); what a file means is
``readers.READERS``, keyed by suffix: a new source or format is one entry.
``pretrained.py`` names Hub weights by model and tag (timm's and open_clip's).

The per-family converters live beside their models and are registered with
``vit_jax.models.convert``.
"""

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import tree
from vit_jax.weights.adapt import DEFAULT_REINIT, LoadReport, adapt
from vit_jax.weights.files import LoadError, register_scheme
from vit_jax.weights.readers import READERS, read

__all__ = ["load", "read", "adapt", "LoadError", "LoadReport", "DEFAULT_REINIT",
           "READERS", "register_scheme"]


def load(source: Any, model: Any, fresh_variables: Mapping[str, Any], *,
         model_name: Optional[str] = None, reinit: str = DEFAULT_REINIT,
         allow_partial: bool = False, posemb_method: str = "bicubic",
         posemb_antialias: bool = True) -> tuple[dict, LoadReport]:
  """Pretrained variables for ``model`` from ``source`` (any supported format).

  Args:
    source: a path (or a registered scheme's source).
    model: the Flax module to load into.
    fresh_variables: the model's freshly initialised variables (``model.init``), the
      source of re-initialised parameters and the reference for names and shapes;
      shapes alone (``jax.eval_shape`` of ``model.init``) do when the source gives
      every parameter (an error names what it lacks).
    model_name: the registered name (needed for timm and open_clip state dicts).
    reinit: regex of parameter names that may be re-initialised when missing or of
      another shape (the head for a new class count).
    allow_partial: load what fits; missing names keep their fresh values and
      unexpected ones are dropped, all listed in the report.
    posemb_method, posemb_antialias: how a position embedding is resampled.
  Returns:
    (variables with the same collections as ``fresh_variables``, LoadReport)
  """
  arrays, fmt = read(source, model, model_name)
  report = LoadReport(source=os.fspath(source), format=fmt)
  target, fresh = {}, {}
  for collection, variables in fresh_variables.items():
    if collection == "intermediates":
      continue
    prefix = "" if collection == "params" else f"{collection}:"
    for name, value in tree.flatten(variables).items():
      dtype = value.dtype if hasattr(value, "dtype") else jnp.asarray(value).dtype
      target[prefix + name] = jax.ShapeDtypeStruct(np.shape(value), dtype)
      fresh[prefix + name] = value
  flat = adapt(arrays, target, fresh, report, reinit=reinit, allow_partial=allow_partial,
               posemb_method=posemb_method, posemb_antialias=posemb_antialias)
  abstract = [k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
  if abstract:
    raise LoadError(f"{report.source} leaves {', '.join(abstract)} to the fresh "
                    "initialisation, but fresh_variables are shapes only "
                    "(jax.eval_shape): pass initialised variables")
  loaded: dict = {}
  for key, value in flat.items():
    collection, name = key.split(":", 1) if ":" in key else ("params", key)
    loaded.setdefault(collection, {})[name] = value
  return ({c: jax.tree.map(jnp.asarray, tree.unflatten(v)) for c, v in loaded.items()},
          report)
