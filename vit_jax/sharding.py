"""Device meshes, and the shardings of batches, activations and train state.

The mesh has three named axes, sized from ``config.mesh`` (``-1`` takes the rest):

  data    pure data parallelism: the batch is split, parameters replicated
  fsdp    the batch is split too, and parameters/optimizer state are sharded
          (fully sharded data parallelism: gathered for use, one layer at a time)
  tensor  Megatron-style model parallelism inside layers: attention heads and MLP
          hidden units are split, activations between blocks are not

Batches (and, inside the models, activations) are split over ``("data", "fsdp")``.

A fourth axis, ``expert`` (``config.mesh.expert``, default 1), exists only when it is
set above 1, so meshes of configs without it keep their three axes. It is data
parallel outside mixture-of-experts layers (the batch is split over it too) and
splits the experts inside them (``models/moe.py``): expert parameters carry the
``expert`` logical axis, which maps to the ``expert`` mesh axis unless the rules say
otherwise.

How a train-state array is sharded, in three steps (``partition_spec``):

1. Its name gives each dimension a *logical axis* (``embed``, ``heads``, ``mlp``...)
   through small regex rules; a parameter no rule names has unnamed dimensions.
   ``PARAM_AXES`` names the shared layers of ``models/layers.py`` by their
   vision_transformer names (``query``/``key``/``value``/``out``, ``MlpBlock*`` or
   ``mlp``/``Dense_{0,1}``), which most families use. A family whose attention or
   MLP layers carry names of their own (MetaFormer's ``mlp/fc1``, CvT's
   ``attention/proj_q``...) declares a rule table beside its model and registers it
   with ``register_param_axes``. Rules of different families never match the same
   parameter with different axes (``tests/test_sharding.py`` checks every family).
2. ``config.sharding.rules`` maps logical axes to mesh axes (``"tensor"``,
   ``"fsdp,tensor"``, or ``"none"``); the default splits ``heads`` and ``mlp``
   over ``tensor``.
3. FSDP: if ``fsdp`` is still unused, the largest dimension divisible by the ``fsdp``
   size is split over it (arrays smaller than ``config.sharding.fsdp_min_size``
   elements stay replicated: gathering them costs more than storing them).

Optimizer state is sharded like its parameters for free: its leaves carry the
parameter names (``opt_state/.../mu/Transformer/.../query/kernel``) and shapes, so the
same rules give the same specs. ``state_shardings`` is the one place rules apply.
"""

import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vit_jax import tree

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
EXPERT_AXIS = "expert"  # only in meshes whose config sets it above 1
ALL_AXES = ("data", "fsdp", EXPERT_AXIS, "tensor")  # the mesh's order when present

# Logical axes by parameter name (searched in the "/"-joined path; first match whose
# rank fits wins). A parameter with one more dimension than its rule has a stacked
# leading "layers" axis (``scan_layers=True``).
PARAM_AXES: list[tuple[str, tuple[str, ...]]] = [
    # Attention, vision_transformer layout: q/k/v [embed, heads, head_dim] are split
    # by heads (each device computes whole heads), out [heads, head_dim, embed] too,
    # so the only communication is one all-reduce after ``out``.
    (r"(^|/)(query|key|value)/kernel$", ("embed", "heads", "head_dim")),
    (r"(^|/)(query|key|value)/bias$", ("heads", "head_dim")),
    (r"(^|/)out/kernel$", ("heads", "head_dim", "embed")),
    # MLP: the first layer split on its output units, the second on its inputs.
    (r"(?i)mlp[^/]*/Dense_0/kernel$", ("embed", "mlp")),
    (r"(?i)mlp[^/]*/Dense_0/bias$", ("mlp",)),
    (r"(?i)mlp[^/]*/Dense_1/kernel$", ("mlp", "embed")),
]

# Logical axis -> mesh axes: "tensor", "fsdp,tensor" (several), "none" (not split).
# A mapping or a sequence of (logical, mesh) pairs.
DEFAULT_RULES: dict[str, str] = {"heads": "tensor", "mlp": "tensor"}
DEFAULT_FSDP_MIN_SIZE = 2**14  # elements: 64 KiB in float32


# Rule tables that model families register for the layers they name themselves.
_FAMILY_AXES: list[tuple[str, tuple[Optional[str], ...]]] = []


def register_param_axes(rules: Iterable[tuple[str, Sequence[Optional[str]]]]) -> None:
  """Adds a family's ``(pattern, axes)`` rules, tried before ``PARAM_AXES``.

  ``None`` in ``axes`` leaves that dimension unnamed. Registering a rule again (a
  module imported twice) changes nothing.
  """
  for pattern, axes in rules:
    rule = (pattern, tuple(axes))
    if rule not in _FAMILY_AXES:
      _FAMILY_AXES.append(rule)


def param_rules() -> list[tuple[str, tuple[Optional[str], ...]]]:
  """Every name rule in the order ``logical_axes`` tries them."""
  return _FAMILY_AXES + PARAM_AXES


# ---------------------------------------------------------------- meshes and batches

def mesh_axes(mesh_config: Mapping[str, int]) -> tuple[str, ...]:
  """The mesh's axis names: ``MESH_AXES``, plus ``expert`` when set above 1."""
  if int(mesh_config.get(EXPERT_AXIS, 1)) != 1:
    return ALL_AXES
  return MESH_AXES


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves ``{"data": -1, "fsdp": 1, "tensor": 1}`` against a device count.

  The sizes follow ``mesh_axes(mesh_config)``.
  """
  unknown = set(mesh_config) - set(ALL_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {ALL_AXES}")
  names = mesh_axes(mesh_config)
  sizes = [int(mesh_config.get(axis, 1)) for axis in names]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed "
                       f"axes {dict(zip(names, sizes))}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """The ``(data, fsdp, tensor)`` mesh (``expert`` too, when set) over all devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  names = mesh_axes(mesh_config)
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Any) -> tuple[str, ...]:
  """The mesh axes the batch is split over: ``BATCH_AXES`` (and ``expert``)."""
  return BATCH_AXES + ((EXPERT_AXIS,) if EXPERT_AXIS in mesh.axis_names else ())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) dimension to ``("data", "fsdp")``.

  Models call this on the tokens between blocks, so that with FSDP the compiler
  gathers the weights rather than splitting activations along their features. A
  no-op outside a mesh context (``jax.set_mesh``), e.g. in a plain ``model.apply``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  axes = batch_axes(mesh)
  if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))


# ---------------------------------------------------------------- train-state rules

def logical_axes(name: str, shape: Sequence[int]) -> tuple[Optional[str], ...]:
  """Logical axis names of an array from its name; ``None`` for unnamed dimensions."""
  for pattern, axes in param_rules():
    if re.search(pattern, name):
      if len(shape) == len(axes):
        return axes
      if len(shape) == len(axes) + 1:  # stacked by nn.scan over blocks
        return ("layers",) + axes
  return (None,) * len(shape)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
  """``None``/``"none"``/``""``, ``"tensor"``, ``"fsdp,tensor"`` or a tuple of axes."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    entry = entry.split(",")
  return tuple(a.strip() for a in entry if a and a.strip().lower() != "none")


def _rule_map(rules: Any) -> dict[str, tuple[str, ...]]:
  pairs = rules.items() if hasattr(rules, "items") else rules
  rule_map = {str(k): _mesh_axes(v) for k, v in pairs}
  unknown = {a for axes in rule_map.values() for a in axes} - set(ALL_AXES)
  if unknown:
    raise ValueError(f"sharding rules name unknown mesh axes {sorted(unknown)}; "
                     f"the mesh axes are {ALL_AXES}")
  # Experts split over the expert axis unless a rule says otherwise (configs list
  # their rules in full, and older ones predate the axis).
  return {EXPERT_AXIS: (EXPERT_AXIS,), **rule_map}


def partition_spec(name: str, shape: Sequence[int], mesh_sizes: Mapping[str, int], *,
                   rules: Union[Mapping[str, Any], Iterable[tuple[str, Any]]] = DEFAULT_RULES,
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
                   not_divisible: Optional[list[str]] = None) -> P:
  """The ``PartitionSpec`` of one train-state array (see the module docstring).

  A logical axis whose size the mesh axes do not divide stays replicated; its name
  is appended to ``not_divisible`` when a list is given.
  """
  rule_map = _rule_map(rules)
  dims: list[tuple[str, ...]] = []  # mesh axes of each dimension
  for dim, (size, axis) in enumerate(zip(shape, logical_axes(name, shape))):
    # Axes of size 1 split nothing: leaving them out frees the dimension for FSDP.
    mesh_axes = tuple(a for a in rule_map.get(axis, ()) if mesh_sizes.get(a, 1) > 1)
    devices = math.prod(mesh_sizes[a] for a in mesh_axes)
    if mesh_axes and size % devices:
      if not_divisible is not None:
        not_divisible.append(f"{name} dim {dim} ({axis}={size}) over "
                             f"{'x'.join(mesh_axes)}={devices}")
      mesh_axes = ()
    dims.append(mesh_axes)
  fsdp = mesh_sizes.get("fsdp", 1)
  if (fsdp > 1 and not any("fsdp" in d for d in dims)
      and math.prod(shape) >= fsdp_min_size):
    # The largest dimension FSDP can split, preferring one no rule split already.
    split = lambda d: math.prod(mesh_sizes[a] for a in dims[d])
    fits = [d for d, size in enumerate(shape) if size % (split(d) * fsdp) == 0]
    if fits:
      best = max(fits, key=lambda d: (not dims[d], shape[d], -d))
      dims[best] = dims[best] + ("fsdp",)
  return P(*(None if not d else d[0] if len(d) == 1 else d for d in dims))


def state_shardings(abstract_state: Any, mesh: Mesh,
                    sharding_config: Optional[Mapping[str, Any]] = None) -> Any:
  """``NamedSharding`` for every leaf of a train state (params, optimizer state...).

  Args:
    abstract_state: the state's tree of shapes (``jax.eval_shape`` of its init).
    mesh: the device mesh.
    sharding_config: ``config.sharding`` (``rules``, ``fsdp_min_size``); None (or
      missing keys) for the defaults.
  """
  sharding_config = sharding_config or {}
  rules = sharding_config.get("rules")
  rules = _rule_map(DEFAULT_RULES if rules is None else rules)
  min_size = sharding_config.get("fsdp_min_size")
  min_size = DEFAULT_FSDP_MIN_SIZE if min_size is None else int(min_size)
  sizes = dict(mesh.shape)
  not_divisible: list[str] = []

  def leaf_sharding(path, leaf):
    spec = partition_spec(tree.path_name(path), tuple(leaf.shape), sizes, rules=rules,
                          fsdp_min_size=min_size, not_divisible=not_divisible)
    return NamedSharding(mesh, spec)

  shardings = jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)
  if not_divisible:
    logging.warning("sharding rules left %d arrays replicated along a dimension the "
                    "mesh does not divide: %s", len(not_divisible),
                    "; ".join(not_divisible[:8]))
  return shardings


def bytes_per_device(tree: Any) -> tuple[int, int]:
  """``(bytes on the first local device, bytes of the whole arrays)`` of a tree.

  Reads the arrays' addressable shards when given arrays, or their shardings when
  given ``jax.ShapeDtypeStruct``s with a ``sharding`` (nothing is allocated).
  """
  device = jax.local_devices()[0]
  local = total = 0
  for x in jax.tree.leaves(tree):
    itemsize = np.dtype(x.dtype).itemsize
    total += math.prod(x.shape) * itemsize
    if isinstance(x, jax.Array):
      local += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
    else:
      local += math.prod(x.sharding.shard_shape(x.shape)) * itemsize
  return local, total


def describe(shardings: Any, limit: Optional[int] = None) -> str:
  """``name: PartitionSpec`` lines, for logs and for checking the rules."""
  lines = [f"{tree.path_name(p)}: {s.spec}" for p, s in
           jax.tree_util.tree_flatten_with_path(shardings)[0]]
  return "\n".join(lines[:limit])
