"""Cheaper XLA compiles for test modules that build many small models.

On CPU, XLA's optimisation passes cost more than they save for the tiny models and few
steps of wiring, parity and training tests (about 40% less CPU for a 30-step training
run). Numerics stay float32 (the parity tests still hold at 1e-4). Module-scoped so
that other test modules keep the defaults::

  from cheap_compiles import cheap_compiles  # noqa: F401  (autouse fixture)
"""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def cheap_compiles():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
