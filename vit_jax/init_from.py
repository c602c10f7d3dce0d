"""``init_from.load`` and ``init_from.read``: the names the README and colabs use for
``vit_jax.weights`` (see there), and the tree helpers they use with them."""

from vit_jax.tree import flatten, unflatten
from vit_jax.weights import DEFAULT_REINIT, LoadError, LoadReport, adapt, load, read

__all__ = ["load", "read", "adapt", "flatten", "unflatten", "LoadError", "LoadReport",
           "DEFAULT_REINIT"]
