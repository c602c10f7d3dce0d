"""Config files that build on another config file beside them.

Config files are loaded by path (``--config=configs/x.py``), not imported as a
package, so a variant (the digits configs on ``configs/digits_vit.py``) loads its base
by path, as ml_collections' config flag does. Imports nothing heavy: configs load
before JAX and TensorFlow do.
"""

import importlib.util
import pathlib


def sibling_config(this_file: str, name: str, arg=None):
  """``get_config(arg)`` of the config file ``name`` in ``this_file``'s directory."""
  path = pathlib.Path(this_file).with_name(name)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
