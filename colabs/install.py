"""Installs vit_jax from a clone into the running environment: the notebooks' setup.

  python colabs/install.py [REPO_DIR]   # REPO_DIR: the clone (default: this file's)

The notebooks run it in a fresh Colab after cloning the repository. It installs the
package editable (configs/ stays beside it, where ``config_files.get_config`` finds
it) and then only the requirements the environment lacks: pip keeps packages that
already satisfy a bound, so Colab's own JAX (with its GPU/TPU plugin) and TensorFlow
are not replaced. One exception pip cannot see: ``tensorflow-cpu`` is a different
distribution from Colab's ``tensorflow`` but the same module, and installing it over
the GPU build would mix two TensorFlows; where ``tensorflow`` is installed, it is
kept and serves tf.data.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

# A distribution the environment may already provide under another name.
PROVIDED_BY = {"tensorflow-cpu": ("tensorflow", "tf-nightly")}


def _name(requirement: str) -> str:
  return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(requires: list[str], installed: set[str]) -> list[str]:
  """The runtime requirements to hand to pip (extras dropped; a requirement whose
  module another installed distribution provides, dropped)."""
  installed = {name.lower().replace("_", "-") for name in installed}
  keep = []
  for requirement in requires:
    if "extra ==" in requirement.replace('"', " ").replace("'", " "):
      continue
    if installed & set(PROVIDED_BY.get(_name(requirement), ())):
      continue
    keep.append(requirement)
  return keep


def main(repo: str) -> None:
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  subprocess.run(pip + ["--no-deps", "-e", repo], check=True)
  installed = {d.metadata["Name"] for d in importlib.metadata.distributions()}
  wanted = requirements(importlib.metadata.requires("vit_jax") or [], installed)
  subprocess.run(pip + wanted, check=True)
  print(f"installed vit_jax from {repo} and {len(wanted)} requirements (pip kept "
        "those already satisfied)")


if __name__ == "__main__":
  main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                       os.path.join(os.path.dirname(__file__), "..")))
