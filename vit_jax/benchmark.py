"""``python -m vit_jax.benchmark``: runs ``vit_jax.tools.benchmark`` (the command)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("vit_jax.tools.benchmark", run_name="__main__", alter_sys=True)
