"""``python -m vit_jax.memory``: runs ``vit_jax.tools.memory`` (the command)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("vit_jax.tools.memory", run_name="__main__", alter_sys=True)
