"""Config files: found without assuming the working directory, and built on each other.

Config files are loaded by path (``--config=configs/x.py``), not imported as a
package, so a variant (the digits configs on ``configs/digits_vit.py``) loads its base
by path, as ml_collections' config flag does. A notebook or script that runs from any
directory finds them with ``get_config("digits_vit")``: ``configs/`` of the checkout
the package runs from (a clone, or the source of ``pip install -e``), or the folder
``$VIT_JAX_CONFIGS`` names. Imports nothing heavy: configs load before JAX and
TensorFlow do.
"""

import difflib
import importlib.util
import os
import pathlib
from typing import Optional

ENV = "VIT_JAX_CONFIGS"


def _load(path: pathlib.Path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def sibling_config(this_file: str, name: str, arg=None):
  """``get_config(arg)`` of the config file ``name`` in ``this_file``'s directory."""
  return _load(pathlib.Path(this_file).with_name(name), arg)


def checkout_dir() -> Optional[pathlib.Path]:
  """The repository the package runs from (``vit_jax/`` beside ``configs/``), if any.

  None for a plain (non-editable) install, which carries the package only.
  """
  root = pathlib.Path(__file__).resolve().parents[1]
  return root if (root / "configs").is_dir() and (root / "vit_jax").is_dir() else None


def configs_dir() -> pathlib.Path:
  """``$VIT_JAX_CONFIGS``, else ``configs/`` of the checkout; a clear error if neither."""
  if os.environ.get(ENV):
    path = pathlib.Path(os.environ[ENV])
    if not path.is_dir():
      raise FileNotFoundError(f"${ENV}={path} is not a directory of config files")
    return path
  root = checkout_dir()
  if root is None:
    raise FileNotFoundError(
        f"no configs/ beside the installed vit_jax ({pathlib.Path(__file__).parent}): "
        "config files live in the repository, not in the package. Clone it and "
        f"`pip install -e` the clone, or set ${ENV} to a folder of config files")
  return root / "configs"


def get_config(name: str, arg=None):
  """``get_config(arg)`` of ``configs/NAME.py`` (``name`` with or without ``.py``)."""
  folder = configs_dir()
  path = folder / (name if name.endswith(".py") else f"{name}.py")
  if not path.is_file():
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    close = difflib.get_close_matches(path.stem, names, n=3)
    raise FileNotFoundError(f"no config {path.name} in {folder}"
                            + (f"; close matches: {', '.join(close)}" if close else ""))
  return _load(path, arg)
