"""Parameter trees by name: ``{"a": {"b": x}}`` <-> ``{"a/b": x}``.

Checkpoints, converters, sharding rules, weight-decay masks and freezing all address
parameters by their ``/``-joined path (``Transformer/encoderblock_0/.../kernel``);
these helpers are the one way to get that name.
"""

from typing import Any, Mapping

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested mappings -> ``{"a/b": leaf}``; anything that is not a mapping is a leaf."""
  flat = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(f"{prefix}{SEP}{key}" if prefix else str(key), value)
    else:
      flat[prefix] = node

  visit("", tree)
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{"a/b": leaf}`` -> nested dicts (the inverse of ``flatten``)."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(SEP)
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def path_name(path) -> str:
  """A JAX key path (``tree_map_with_path``) as ``"opt_state/0/mu/head/kernel"``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return SEP.join(parts)


def sown(intermediates: Mapping[str, Any]) -> dict[str, Any]:
  """Flat names -> the last value sown there (``sow`` keeps a tuple of every call)."""
  return {k: v[-1] if isinstance(v, tuple) else v for k, v in flatten(intermediates).items()}
