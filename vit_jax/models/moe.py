"""Mixture-of-experts MLP layers: Soft MoE and sparse top-k (V-MoE) routing.

Written here because no maintained JAX library offers these as Linen layers (vmoe is
a research codebase, not a dependency); facts and defaults follow
google-research/vmoe (V-MoE: Riquelme et al. 2021; Soft MoE: Puigcerver et al. 2023).

``MoeMlp`` replaces a block's MLP (``Encoder1DBlock.mlp``, see ``vit.py``). Its
parameters, under the block's ``Moe`` scope::

  Router/dense/kernel   [D, E]        top-k routers (no bias, as in vmoe)
  Router/mu, scale      [D, E, P], () Soft MoE (slot parameters, logit scale)
  Experts/Dense_{0,1}/{kernel,bias}   the expert MLPs, stacked on a leading E axis

Routing runs per image (one group = one image's tokens), with static shapes: each
expert takes ``capacity`` tokens (top-k) or ``num_slots`` slots (soft) per group.

* **top-k** (``router="top1"|"top2"``): gates = softmax(x W) over experts; each token
  picks its k best experts. Expert buffers fill first with every token's 1st choice,
  then the 2nd; with ``batch_priority`` tokens with a larger top gate go first
  (Batch Priority Routing), else in token order. A choice that finds its expert's
  buffer full is dropped (the token's residual passes it by). Capacity per expert
  and group is ``ceil(tokens * k * capacity_factor / E)``. The output of a token is
  ``sum over kept choices of gate * expert(x)``; ``renormalize`` divides the gates by
  their sum over the k choices (then, with identical experts and nothing dropped,
  the layer equals the dense MLP: what upcycling needs). Training adds noise
  ``N(0, (noise_std / E)^2)`` to the logits (noisy gating) and the auxiliary losses
  of V-MoE: importance ``CV(sum_tokens gates)^2`` and load ``CV(sum_tokens P(expert
  in the noisy top-k))^2``, weighted by ``importance_loss_weight`` and
  ``load_loss_weight`` (0.005 each in vmoe's configs) and averaged over groups.
* **soft** (``router="soft"``): logits ``<l2norm(x), scale * l2norm(mu)>`` for every
  (token, expert, slot); slot inputs are softmax-over-tokens mixtures of the tokens,
  each expert processes its slots, and every token takes the softmax-over-all-slots
  mixture of the slot outputs. Nothing is dropped; no auxiliary loss.
* **ewa** (``router="ewa"``, Experts Weights Averaging, Huang et al. 2023,
  arXiv:2308.06093): a training scheme for a *dense* ViT. While training, each image's
  tokens are split among the experts by a random uniform partition (a random
  permutation dealt round-robin: every expert gets ``ceil(tokens / E)`` slots, every
  token exactly one expert, gate 1; no router parameters), and after every
  ``ewa_every`` updates each expert moves toward the others,
  ``W_i <- ewa_share * W_i + (1 - ewa_share) * mean_{j != i} W_j``
  (``expert_weights_averaging``, an optax transform the classification trainer
  chains last; the experts' mean is unchanged by it). Evaluation (``train=False``)
  runs the averaged expert as one MLP, which is what ``collapse_ewa`` turns the
  checkpoint into: a plain ViT of the same name without ``moe``.

The layer sows into the ``aux`` collection (``AUX_COLLECTION``; not at init, so it
never becomes model state): ``loss`` (the weighted auxiliary loss of this layer, 0
for soft) and ``metrics`` (importance/load losses, the fraction of dropped choices,
routing weight statistics). A trainer that applies the model with ``aux`` mutable
adds the losses to its loss and logs the metrics (``auxiliary_losses``; the
classification trainer does).

Expert parallelism: with an ``expert`` mesh axis (``sharding.EXPERT_AXIS``), expert
parameters are split over it (the rules below), the batch is split over it outside
the MoE layers, and the dispatched tokens ``[groups, experts, capacity, D]`` are
constrained to experts over ``expert``, so XLA's SPMD partitioner moves them with an
all-to-all (as vmoe does with pjit) and back after the experts. ``dispatch="all_to_all"``
writes that communication out instead (``expert_parallel_apply``): inside
``jax.shard_map`` each device builds its own groups' buffers ``[E, G, C, D]``, one
``jax.lax.all_to_all`` over ``expert`` sends every expert's buffers to the device
holding it, the local experts run, and a second all-to-all brings the outputs back to
be combined where their tokens live. Same numbers as the einsum path; without an
``expert`` axis above 1 (or when the groups or experts do not split evenly) the layer
takes the einsum path.
"""

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import sharding, tree
from vit_jax.models import layers

Array = Any

ROUTERS = ("soft", "top1", "top2", "ewa")
DISPATCHES = ("einsum", "all_to_all")
AUX_COLLECTION = "aux"

# Expert parameters carry the "expert" logical axis; the default rules map it to the
# "expert" mesh axis (see sharding.partition_spec).
sharding.register_param_axes([
    (r"(^|/)Moe/Experts/Dense_0/kernel$", ("expert", "embed", "mlp")),
    (r"(^|/)Moe/Experts/Dense_0/bias$", ("expert", "mlp")),
    (r"(^|/)Moe/Experts/Dense_1/kernel$", ("expert", "mlp", "embed")),
    (r"(^|/)Moe/Experts/Dense_1/bias$", ("expert", "embed")),
    (r"(^|/)Moe/Router/dense/kernel$", ("embed", None)),
    (r"(^|/)Moe/Router/mu$", ("embed", None, None)),
])


@dataclasses.dataclass(frozen=True)
class MoeSettings:
  """The ``moe`` setting of the plain ViT (``models.create(name, moe=dict(...))``).

  layers: indices of the blocks whose MLP becomes an MoE layer.
  num_experts: experts per MoE layer.
  router: "soft", "top1" or "top2".
  capacity_factor: top-k: expert capacity per image is ``ceil(tokens * k * cf / E)``.
  num_slots: soft: slots per expert (vmoe's Soft MoE models use 1).
  batch_priority: top-k: tokens with larger top gates fill the buffers first.
  noise_std: top-k: logit noise ``noise_std / num_experts`` while training.
  importance_loss_weight, load_loss_weight: top-k auxiliary loss weights.
  renormalize: top-k: combine with the selected gates divided by their sum.
  ewa_share: ewa: the weight an expert keeps at each averaging (the rest goes to
    the mean of the other experts); 1 never averages, 0 replaces each expert with
    the mean of the others.
  ewa_every: ewa: average after every this many optimizer updates.
  dispatch: how tokens reach the experts on a mesh with an ``expert`` axis:
    "einsum" (sharding constraints; XLA's partitioner picks the collectives) or
    "all_to_all" (an explicit ``jax.shard_map`` all-to-all; see the module doc).
    Same numbers, except that the experts' own dropout (``dropout_rate > 0``) draws
    other masks (per device and expert) than the einsum path.
  """
  layers: tuple[int, ...] = ()
  num_experts: int = 8
  router: str = "top2"
  capacity_factor: float = 1.05
  num_slots: int = 1
  batch_priority: bool = False
  noise_std: float = 1.0
  importance_loss_weight: float = 0.005
  load_loss_weight: float = 0.005
  renormalize: bool = False
  ewa_share: float = 0.5
  ewa_every: int = 1
  dispatch: str = "einsum"

  @property
  def k(self) -> int:
    return {"top1": 1, "top2": 2}.get(self.router, 0)

  @classmethod
  def from_mapping(cls, settings: Optional[Mapping[str, Any]],
                   num_layers: int) -> Optional["MoeSettings"]:
    """Validated settings (errors name the setting), or None when MoE is off."""
    if settings is None or isinstance(settings, MoeSettings):
      return settings
    settings = dict(settings)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
      raise ValueError(f"moe has no setting {', '.join(unknown)}; its settings are "
                       f"{', '.join(sorted(fields))}")
    layers_ = settings.get("layers", ())
    if isinstance(layers_, str):  # "1,3,5" from the command line
      layers_ = [int(i) for i in layers_.split(",") if i.strip()]
    settings["layers"] = tuple(sorted({int(i) for i in layers_}))
    out = cls(**settings)
    if not out.layers:
      return None
    bad = [i for i in out.layers if not 0 <= i < num_layers]
    if bad:
      raise ValueError(f"moe.layers={out.layers}: blocks {bad} do not exist "
                       f"(num_layers={num_layers})")
    if out.router not in ROUTERS:
      raise ValueError(f"moe.router must be one of {ROUTERS}, got {out.router!r}")
    if out.num_experts < max(1, out.k):
      raise ValueError(f"moe.num_experts={out.num_experts} must be at least "
                       f"{max(1, out.k)} for moe.router={out.router!r}")
    if out.capacity_factor <= 0:
      raise ValueError(f"moe.capacity_factor must be > 0, got {out.capacity_factor}")
    if out.num_slots < 1:
      raise ValueError(f"moe.num_slots must be >= 1, got {out.num_slots}")
    if out.router == "ewa" and out.num_experts < 2:
      raise ValueError(f"moe.num_experts={out.num_experts}: moe.router='ewa' averages "
                       "experts, so it needs at least 2")
    if not 0.0 <= out.ewa_share <= 1.0:
      raise ValueError(f"moe.ewa_share must lie in [0, 1], got {out.ewa_share}")
    if out.ewa_every < 1:
      raise ValueError(f"moe.ewa_every must be >= 1, got {out.ewa_every}")
    if out.dispatch not in DISPATCHES:
      raise ValueError(f"moe.dispatch must be one of {DISPATCHES}, got {out.dispatch!r}")
    return out


def capacity(tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Tokens each expert takes per group: ``ceil(tokens * k * cf / E)``, at least 1."""
  return max(1, math.ceil(tokens * k * capacity_factor / num_experts))


# ---------------------------------------------------------------- routing (pure)

def top_k_routing(gates: Array, k: int, capacity_: int,
                  batch_priority: bool) -> tuple[Array, Array, Array]:
  """Gates ``[G, S, E]`` -> ``(dispatch [G, S, E, C] bool, weights [G, S, E], kept)``.

  ``weights`` holds each token's gate for the experts it selected (0 elsewhere);
  ``kept [G, S, k]`` says which of its k choices found room.
  """

  def one_group(g):
    tokens, num_experts = g.shape
    top_gate, choice = jax.lax.top_k(g, k)  # [S, k]
    order = (jnp.argsort(-top_gate[:, 0], stable=True) if batch_priority
             else jnp.arange(tokens))
    # Choices in fill order: every token's 1st choice (in priority order), then 2nd.
    ordered = choice[order].T.reshape(-1)  # [k * S]
    onehot = jax.nn.one_hot(ordered, num_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # in buffer
    position = position.reshape(k, tokens).T  # [S (priority order), k]
    inverse = jnp.argsort(order)
    position = position[inverse]
    kept = position < capacity_
    slot = jnp.where(kept, position, capacity_)  # one_hot of capacity_ is all zeros
    dispatch = jnp.einsum("ske,skc->sec", jax.nn.one_hot(choice, num_experts),
                          jax.nn.one_hot(slot, capacity_)) > 0
    weights = jnp.sum(jax.nn.one_hot(choice, num_experts) * top_gate[..., None], axis=1)
    return dispatch, weights, kept

  return jax.vmap(one_group)(gates)


def random_partition(key: Optional[Array], groups: int, tokens: int,
                     num_experts: int) -> Array:
  """EWA's random uniform partition: dispatch ``[G, S, E, C]`` (bool), C = ceil(S/E).

  Each group's tokens in a random order (token order when ``key`` is None), dealt
  round-robin to the experts: token of rank r goes to expert ``r % E``, slot ``r // E``.
  """
  cap = -(-tokens // num_experts)
  if key is None:
    rank = jnp.broadcast_to(jnp.arange(tokens), (groups, tokens))
  else:
    rank = jnp.argsort(jax.random.uniform(key, (groups, tokens)), axis=-1)
    rank = jnp.argsort(rank, axis=-1)  # the position of each token in that order
  return jnp.einsum("gse,gsc->gsec", jax.nn.one_hot(rank % num_experts, num_experts),
                    jax.nn.one_hot(rank // num_experts, cap)) > 0


def importance_loss(gates: Array) -> Array:
  """V-MoE's importance loss per group: ``CV(sum over tokens of gates)^2``. [G]"""
  importance = jnp.sum(gates, axis=1)
  return (jnp.std(importance, axis=-1) / jnp.mean(importance, axis=-1)) ** 2


def load_loss(logits: Array, noisy_logits: Array, noise_std: float, k: int) -> Array:
  """V-MoE's load loss per group: ``CV(sum over tokens of P(e in noisy top-k))^2``.

  P is the probability, under fresh noise on that logit alone, that expert e beats
  the k-th largest noisy logit of the token. [G]
  """
  threshold = jax.lax.top_k(noisy_logits, k)[0][..., -1:]
  prob = 1.0 - jax.scipy.stats.norm.cdf((threshold - logits) / noise_std)
  load = jnp.mean(prob, axis=1)
  return (jnp.std(load, axis=-1) / jnp.mean(load, axis=-1)) ** 2


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def soft_routing(x: Array, mu: Array, scale: Array) -> tuple[Array, Array]:
  """Soft MoE weights: ``(dispatch, combine)``, both ``[G, S, E, P]``.

  dispatch: softmax over tokens (each slot mixes the tokens); combine: softmax over
  all slots (each token mixes the slot outputs).
  """
  logits = jnp.einsum("gsd,dep->gsep", l2_normalize(x),
                      scale * l2_normalize(mu, axis=0))
  return jax.nn.softmax(logits, axis=1), jax.nn.softmax(logits, axis=(2, 3))


# ---------------------------------------------------------------- expert parallelism

def _constrain(x: Array, spec: tuple) -> Array:
  """A sharding constraint when a mesh with the expert axis is set and divides x."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or sharding.EXPERT_AXIS not in mesh.axis_names:
    return x
  dims = [tuple(a for a in ((s,) if isinstance(s, str) else s) if a in mesh.axis_names)
          for s in spec]
  if any(size % math.prod(mesh.shape[a] for a in axes)
         for size, axes in zip(x.shape, dims)):
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(*(axes or None for axes in dims)))


def to_experts(x: Array) -> Array:
  """``[G, E, C, D]`` dispatched tokens: groups over data/fsdp, experts over expert."""
  return _constrain(x, (sharding.BATCH_AXES, sharding.EXPERT_AXIS))


def from_experts(x: Array) -> Array:
  """``[G, E, C, D]`` expert outputs back to groups over every batch axis."""
  return _constrain(x, (sharding.BATCH_AXES + (sharding.EXPERT_AXIS,),))


def _all_to_all_mesh(groups: int, num_experts: int) -> Optional[Any]:
  """The context mesh when the all-to-all path applies to it: an ``expert`` axis
  above 1 that divides the experts, and batch axes that divide the groups."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(sharding.EXPERT_AXIS, 1) <= 1:
    return None
  axes = [a for a in sharding.batch_axes(mesh) if a in mesh.axis_names]
  if num_experts % mesh.shape[sharding.EXPERT_AXIS] or groups % math.prod(
      mesh.shape[a] for a in axes):
    return None
  return mesh


def expert_parallel_apply(mesh: Any, expert_fn, expert_params: Any, x: Array,
                          dispatch: Array, combine: Array,
                          key: Optional[Array] = None) -> Array:
  """The MoE layer's token exchange as an explicit all-to-all under ``jax.shard_map``.

  x ``[G, S, D]`` and the routing weights ``[G, S, E, C]`` are split over the batch
  axes (``expert`` included), ``expert_params`` (experts on the leading axis) over
  ``expert``. ``expert_fn(params, slots [G', C, D], key)`` runs one expert. Each device
  dispatches its groups into ``[E, G, C, D]``; the first all-to-all splits E over the
  ``expert`` axis and gathers the groups (``[E / n, G * n, C, D]``: this device's
  experts, every peer's tokens), the second undoes it after the experts.
  """
  P = jax.sharding.PartitionSpec
  batch = tuple(a for a in sharding.batch_axes(mesh) if a in mesh.axis_names)
  axis = sharding.EXPERT_AXIS

  def local(params, x, dispatch, combine, key):
    slots = jnp.einsum("gsec,gsd->egcd", dispatch, x)
    slots = jax.lax.all_to_all(slots, axis, split_axis=0, concat_axis=1, tiled=True)
    keys = None
    if key is not None:  # a different dropout stream on every device and expert
      key = jax.random.fold_in(key, jax.lax.axis_index(batch))
      keys = jax.random.split(key, slots.shape[0])
    y = jax.vmap(expert_fn, in_axes=(0, 0, None if keys is None else 0))(
        params, slots, keys)
    y = jax.lax.all_to_all(y, axis, split_axis=1, concat_axis=0, tiled=True)
    return jnp.einsum("gsec,egcd->gsd", combine, y)

  # check_vma=False: jax (0.10-0.12) fails its varying-axes check on the derivative
  # of the exact GELU's erf ("polynomial"); the worker test checks the gradients.
  return jax.shard_map(
      local, mesh=mesh, check_vma=False,
      in_specs=(jax.tree.map(lambda _: P(axis), expert_params), P(batch), P(batch),
                P(batch), None if key is None else P()),
      out_specs=P(batch))(expert_params, x, dispatch, combine, key)


def auxiliary_losses(aux: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
  """The ``aux`` collection of an apply -> (summed loss, metrics averaged over layers).

  Metrics are named ``moe/<metric>``, plus ``moe/aux_loss`` (the sum); an empty
  collection (a model without MoE layers) gives ``(0.0, {})``. Other layers use the
  same collection (DynamicViT's keep-ratio loss, ``models/vit.py``): a metric name
  that already holds a ``/`` keeps its own prefix, and without MoE metrics the sum
  is logged as ``aux_loss``.
  """
  total, values = 0.0, {}
  for name, value in tree.sown(aux).items():
    if name.rsplit("/", 1)[-1] == "loss":
      total = total + value
    else:
      for key, metric in value.items():
        values.setdefault(key if "/" in key else f"moe/{key}", []).append(metric)
  if not values and isinstance(total, float):
    return total, {}
  metrics = {k: sum(v) / len(v) for k, v in sorted(values.items())}
  moe_metrics = any(k.startswith("moe/") for k in metrics)
  return total, {"moe/aux_loss" if moe_metrics else "aux_loss": total, **metrics}


# ---------------------------------------------------------------- the layer

class Router(nn.Module):
  """Routing weights for ``[G, S, D]`` tokens (``Router`` scope of an MoE layer).

  Returns ``(dispatch, combine, aux_loss, metrics)``: dispatch and combine weights
  ``[G, S, E, C]`` (C: capacity or slots per expert), the weighted auxiliary loss
  (mean over groups) and the loss terms and routing statistics to log.
  """
  settings: MoeSettings
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool):
    s = self.settings
    _, tokens, dim = x.shape
    x = x.astype(jnp.float32)  # routing decisions in float32 whatever the compute dtype
    if s.router == "ewa":
      # Training draws the partition from the "dropout" stream; init runs in order.
      key = self.make_rng("dropout") if train else None
      dispatch = random_partition(key, x.shape[0], tokens, s.num_experts)
      return dispatch, dispatch.astype(jnp.float32), jnp.zeros((), jnp.float32), {}
    if s.router == "soft":
      mu = self.param("mu", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                      (dim, s.num_experts, s.num_slots), self.param_dtype)
      scale = self.param("scale", nn.initializers.ones, (), self.param_dtype)
      dispatch, combine = soft_routing(x, mu.astype(jnp.float32),
                                       scale.astype(jnp.float32))
      metrics = {"combine_weights_max": jnp.mean(jnp.max(combine, axis=(2, 3))),
                 "dispatch_weights_max": jnp.mean(jnp.max(dispatch, axis=1))}
      return dispatch, combine, jnp.zeros((), jnp.float32), metrics
    logits = layers.Dense(s.num_experts, use_bias=False, dtype=jnp.float32,
                          param_dtype=self.param_dtype, name="dense")(x)
    gates = jax.nn.softmax(logits)
    importance = importance_loss(gates)
    aux = s.importance_loss_weight * importance
    metrics = {"importance_loss": jnp.mean(importance)}
    if train and s.noise_std > 0:
      # Noisy gating; the noise draws from the "dropout" stream the trainers provide.
      noise_std = s.noise_std / s.num_experts
      noisy = logits + noise_std * jax.random.normal(self.make_rng("dropout"),
                                                     logits.shape)
      load = load_loss(logits, noisy, noise_std, s.k)
      aux = aux + s.load_loss_weight * load
      metrics["load_loss"] = jnp.mean(load)
      gates = jax.nn.softmax(noisy)
    cap = capacity(tokens, s.num_experts, s.k, s.capacity_factor)
    dispatch, weights, kept = top_k_routing(gates, s.k, cap, s.batch_priority)
    if s.renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    combine = weights[..., None] * dispatch
    metrics["dropped_fraction"] = 1.0 - jnp.mean(kept.astype(jnp.float32))
    return dispatch, combine, jnp.mean(aux), metrics


class _Expert(layers.MlpBlock):
  """``MlpBlock`` with ``train`` as a field: ``nn.vmap`` maps positional inputs only."""
  train: bool = False

  @nn.compact
  def __call__(self, inputs: Array) -> Array:  # pytype: disable=signature-mismatch
    return super().__call__(inputs, train=self.train)


class MoeMlp(nn.Module):
  """An MoE of ``layers.MlpBlock`` experts on ``[B, N, D]`` tokens (see the module doc).

  One routing group per image. Experts start identical (vmoe's ``split_rngs=False``);
  the router breaks the symmetry.
  """
  settings: MoeSettings
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    experts = nn.vmap(_Expert, in_axes=1, out_axes=1, variable_axes={"params": 0},
                      split_rngs={"params": False, "dropout": True})(
                          mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                          gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                          param_dtype=self.param_dtype, train=train, name="Experts")
    if self.settings.router == "ewa" and not train and not self.is_initializing():
      # EWA evaluates the averaged expert: the dense MLP that collapse_ewa exports.
      mean = jax.tree.map(lambda p: jnp.mean(p, axis=0),
                          self.variables["params"]["Experts"])
      self.sow(AUX_COLLECTION, "loss", jnp.zeros((), jnp.float32))
      self.sow(AUX_COLLECTION, "metrics", {})
      return layers.MlpBlock(
          mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
          gelu_approximate=self.gelu_approximate, dtype=self.dtype,
          param_dtype=self.param_dtype).apply({"params": mean}, x, train=False)
    dispatch, combine, aux, metrics = Router(self.settings, self.param_dtype,
                                             name="Router")(x, train=train)
    if self.settings.router == "ewa" and not self.is_initializing():
      # How far the experts are apart (what the averaging keeps in check).
      kernel = self.variables["params"]["Experts"]["Dense_0"]["kernel"]
      mean = jnp.mean(kernel, axis=0, keepdims=True)
      metrics = {"expert_spread": jnp.sqrt(jnp.sum(jnp.square(kernel - mean)) / (
          kernel.shape[0] * jnp.sum(jnp.square(mean)) + 1e-12))}
    if not self.is_initializing():
      self.sow(AUX_COLLECTION, "loss", aux)
      self.sow(AUX_COLLECTION, "metrics", metrics)
    dispatch, combine = dispatch.astype(x.dtype), combine.astype(x.dtype)
    mesh = (None if self.settings.dispatch != "all_to_all" or self.is_initializing()
            else _all_to_all_mesh(x.shape[0], self.settings.num_experts))
    if mesh is not None:
      expert = _Expert(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                       gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                       param_dtype=self.param_dtype, train=train)
      dropout = train and self.dropout_rate > 0

      def expert_fn(params, slots, key):
        return expert.apply({"params": params}, slots,
                            rngs={"dropout": key} if dropout else None)

      return expert_parallel_apply(
          mesh, expert_fn, self.variables["params"]["Experts"], x, dispatch, combine,
          self.make_rng("dropout") if dropout else None)
    slots = to_experts(jnp.einsum("gsec,gsd->gecd", dispatch, x))
    # Each expert maps its [G, C, D] slice (vmapped over the expert axis, no reshape,
    # so the expert-axis sharding carries straight through).
    y = experts(slots)
    y = from_experts(y)
    return jnp.einsum("gsec,gecd->gsd", combine, y)


# ---------------------------------------------------------------- EWA weight averaging

EXPERTS_PATTERN = r"(^|/)Moe/Experts/"


class EwaState(NamedTuple):
  count: Array  # updates so far


def average_experts(w: Array, share: float) -> Array:
  """``share * W_i + (1 - share) * mean_{j != i} W_j`` over the leading expert axis."""
  others = (jnp.sum(w, axis=0, keepdims=True) - w) / (w.shape[0] - 1)
  return share * w + (1.0 - share) * others


def expert_weights_averaging(share: float, every: int = 1,
                             pattern: str = EXPERTS_PATTERN
                             ) -> optax.GradientTransformation:
  """EWA as the last optax transform: after every ``every``-th update, the experts'
  parameters (``/``-joined names matching ``pattern``, experts on the leading axis)
  land on ``average_experts(params + updates)`` instead of ``params + updates``.
  Other parameters pass through unchanged."""
  regex = re.compile(pattern)

  def init_fn(params):
    del params
    return EwaState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("expert_weights_averaging needs the parameters (optax update "
                       "with params)")
    count = state.count + 1
    now = count % every == 0

    def one(path, u, p):
      if u is None or not regex.search(tree.path_name(path)):
        return u
      new = p + u
      return jnp.where(now, average_experts(new, share) - p, u).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(one, updates, params)
    return updates, EwaState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def ewa_from_config(tx: optax.GradientTransformation, settings: Optional[Mapping[str, Any]]
                    ) -> optax.GradientTransformation:
  """``tx`` followed by ``expert_weights_averaging`` when the model's ``moe`` setting
  has ``router="ewa"``; ``tx`` itself otherwise."""
  if settings is None:
    return tx
  settings = dict(settings)
  layers_ = settings.get("layers") or ()
  if isinstance(layers_, str):
    layers_ = [int(i) for i in layers_.split(",") if i.strip()]
  # The model checks the block indices; here only the EWA fields matter.
  parsed = MoeSettings.from_mapping(settings, max([int(i) for i in layers_], default=0) + 1)
  if parsed is None or parsed.router != "ewa":
    return tx
  return optax.chain(tx, expert_weights_averaging(parsed.ewa_share, parsed.ewa_every))


def collapse_ewa(params: Mapping[str, Any]) -> dict:
  """An EWA model's parameters -> the plain ViT's: each block's ``Moe`` becomes
  ``MlpBlock_3`` holding the mean of its experts (what evaluation already runs).
  Load them into the same model name without the ``moe`` setting."""

  def walk(node, path):
    if not isinstance(node, Mapping):
      return node
    out = {}
    for key, value in node.items():
      if key == "Moe" and isinstance(value, Mapping) and "Experts" in value:
        if "Router" in value:
          raise ValueError(f"collapse_ewa: {'/'.join(path + ('Moe',))} has a router: "
                           "only moe.router='ewa' layers average into one MLP")
        out["MlpBlock_3"] = jax.tree.map(lambda p: jnp.mean(jnp.asarray(p), axis=0),
                                         dict(value["Experts"]))
      else:
        out[key] = walk(value, path + (key,))
    return out

  return walk(params, ())
