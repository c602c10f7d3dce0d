"""Token reduction for plain ViTs: ToMe merging, EViT fusion and DynamicViT pruning,
with static shapes.

* ToMe (Bolya et al., 2023, "Token Merging: Your ViT but Faster"): between the
  attention and MLP residuals, split the tokens into alternating sets A (even
  positions) and B (odd), match every A token to its most similar B token (cosine of
  the attention keys, averaged over heads), and merge the ``r`` best-matched A tokens
  into their partners, averaging features weighted by how many patches each token
  holds. Attention then adds ``log(size)`` to the logits (proportional attention), so
  a merged token counts as the patches it stands for.
* EViT (Liang et al., 2022, "Not All Patches are What You Need"): in chosen blocks,
  keep the ``ceil(keep_rate * n)`` patch tokens the class token attends to most
  (attention averaged over heads) and fuse the others into one token, their sum
  weighted by that attention.
* DynamicViT (Rao et al., 2021, "DynamicViT: Efficient Vision Transformers with
  Dynamic Token Sparsification"): before chosen blocks, a small prediction module
  (``ScorePredictor``, the paper's local + global MLP) scores every patch token; at
  inference the ``int(rho**s * n)`` best (stage ``s = 1, 2, ...`` of the
  ``n`` input patches) stay and the rest are dropped. In training nothing is dropped:
  a hard Gumbel-softmax sample per token (straight-through) marks it kept or dropped,
  the marks multiply into the token ``size`` (0: dropped) and the attention of the
  later blocks ignores dropped keys (``policy_attention``), so the predictor learns
  through the task loss; each pruning block sows its marks (``keep_decision``, in
  ``intermediates``) for the keep-ratio loss.

Prefix tokens (class, distillation) are never merged, pruned or fused. How many
tokens a block removes depends only on the setting and the token count, so every
shape is static: one compile, no retracing. ToMe's own code patches timm's PyTorch
modules and no maintained JAX library offers either method, hence this module.

Token state carried from block to block: ``size`` ``[batch, tokens]`` (patches per
token, 1 at the start) and, when intermediates are collected, ``source``
``[batch, tokens, input_tokens]`` (1 where a token holds an input token).
"""

import math
from typing import Any, Optional, Sequence, Union

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, registry

Array = jax.Array

# Model settings; families without them get this explanation from the registry.
SETTINGS = ("token_merging", "token_keep_rate", "token_keep_layers", "token_pruning",
            "token_pruning_layers", "token_pruning_ratio_weight")
UNSUPPORTED_FAMILY = (
    "token reduction (ToMe token_merging, EViT token_keep_rate, DynamicViT "
    "token_pruning) works on the plain-ViT "
    "families (vit, deit, the CLIP image towers and the two-tower image side): their "
    "blocks see a flat token sequence. Hierarchical, windowed and convolutional "
    "families need their token grid intact.")
registry.explain_setting(SETTINGS, UNSUPPORTED_FAMILY)


def merge_schedule(token_merging: Union[int, Sequence[int]], num_layers: int
                   ) -> tuple[int, ...]:
  """``r`` for every block from an int (the same in each block) or a per-block tuple."""
  if isinstance(token_merging, (int, np.integer)):
    schedule = (int(token_merging),) * num_layers
  else:
    schedule = tuple(int(r) for r in token_merging)
    if len(schedule) != num_layers:
      raise ValueError(f"token_merging as a tuple needs one r per block ({num_layers}), "
                       f"got {len(schedule)}: {schedule}")
  if any(r < 0 for r in schedule):
    raise ValueError(f"token_merging must be >= 0 in every block, got {schedule}")
  return schedule


def keep_layers(token_keep_layers: Optional[Sequence[int]], num_layers: int,
                setting: str = "token_keep_layers") -> tuple[int, ...]:
  """EViT's reducing blocks (DynamicViT's pruning blocks, ``setting`` names which);
  by default at 1/4, 1/2 and 3/4 depth ((3, 6, 9) of 12, the papers' choice)."""
  if token_keep_layers is None:
    return tuple(sorted({num_layers // 4, num_layers // 2, 3 * num_layers // 4}))
  layers = tuple(int(i) for i in token_keep_layers)
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad or len(set(layers)) != len(layers):
    raise ValueError(f"{setting} must be distinct block indices in [0, "
                     f"{num_layers}), got {tuple(token_keep_layers)}")
  return tuple(sorted(layers))


def check_settings(*, token_merging, token_keep_rate: float, num_prefix_tokens: int,
                   scan_layers: bool, attention: str, attention_dropout_rate: float,
                   token_pruning: float = 1.0, token_pruning_ratio_weight: float = 0.0
                   ) -> None:
  """The errors every model with token reduction shares (one line each)."""
  if not (isinstance(token_pruning_ratio_weight, (int, float))
          and math.isfinite(token_pruning_ratio_weight) and token_pruning_ratio_weight >= 0):
    raise ValueError("token_pruning_ratio_weight must be a finite number >= 0, got "
                     f"{token_pruning_ratio_weight!r}")
  merging = any(np.atleast_1d(token_merging))
  for name, rate in (("token_keep_rate", token_keep_rate), ("token_pruning", token_pruning)):
    if not 0.0 < rate <= 1.0:
      raise ValueError(f"{name} must be in (0, 1], got {rate}")
  chosen = [name for name, on in (("token_merging (ToMe)", merging),
                                  ("token_keep_rate < 1 (EViT)", token_keep_rate < 1.0),
                                  ("token_pruning < 1 (DynamicViT)", token_pruning < 1.0))
            if on]
  if len(chosen) > 1:
    raise ValueError(f"{' and '.join(chosen)} are different ways to reduce tokens: set "
                     "one of them")
  if not chosen:
    return
  setting = chosen[0].split(" ")[0]
  if scan_layers:
    raise ValueError(f"{setting} changes the token count from block to block, which "
                     "nn.scan cannot carry: set scan_layers=False")
  if attention != "softmax":
    raise ValueError(f"{setting} reads softmax attention (keys, class attention): "
                     f"it needs attention='softmax', got {attention!r}")
  if attention_dropout_rate:
    raise ValueError(f"{setting} reads the attention inputs, which the dropout path "
                     "does not expose: set attention_dropout_rate=0")
  if setting == "token_keep_rate" and num_prefix_tokens < 1:
    raise ValueError("token_keep_rate (EViT) ranks tokens by the class token's "
                     "attention: it needs classifier='token'")
  if setting == "token_pruning" and num_prefix_tokens < 1:
    raise ValueError("token_pruning (DynamicViT) classifies from the class token (in "
                     "training the dropped tokens are still there and would enter a "
                     "mean): it needs classifier='token'")
  if num_prefix_tokens > 2:
    raise ValueError(f"token reduction protects at most 2 prefix tokens, got "
                     f"{num_prefix_tokens}")


def effective_merge_schedule(schedule: Sequence[int], num_tokens: int,
                             num_prefix_tokens: int) -> tuple[int, ...]:
  """The ``r`` each block actually merges, for ``num_tokens`` input tokens.

  ToMe's clamp, as its code applies it in every block: a block merges at most
  ``(t - num_prefix_tokens) // 2`` of its ``t`` tokens (the A set holds about half of
  the unprotected ones), so each block keeps at least half of its patch tokens and
  none ever runs out. ``merge_tokens`` applies the same clamp; this states it ahead of
  time (e.g. ViT-L/16 at r=16: the last blocks merge fewer than 16).
  """
  effective, tokens = [], num_tokens
  for r in schedule:
    r = max(0, min(int(r), (tokens - num_prefix_tokens) // 2))
    effective.append(r)
    tokens -= r
  return tuple(effective)


_CLAMP_WARNED = set()  # (requested, tokens, prefix) already reported: say it once


def clamp_merge_schedule(schedule: Sequence[int], num_tokens: int,
                         num_prefix_tokens: int) -> tuple[int, ...]:
  """``effective_merge_schedule``, with one warning per setting when the clamp
  changes what was requested (a ToMe setting ported from a shallower model or a
  larger image merges less than it says)."""
  effective = effective_merge_schedule(schedule, num_tokens, num_prefix_tokens)
  key = (tuple(schedule), num_tokens, num_prefix_tokens)
  if effective != tuple(schedule) and key not in _CLAMP_WARNED:
    _CLAMP_WARNED.add(key)
    changed = [i for i, (a, b) in enumerate(zip(schedule, effective)) if a != b]
    logging.warning(
        "token_merging: a block merges at most half of its unprotected tokens (ToMe's "
        "clamp), so blocks %s merge less than requested: requested r per block %s, "
        "effective %s; %d tokens in, %d after the last block",
        changed, tuple(schedule), effective, num_tokens, num_tokens - sum(effective))
  return effective


def bipartite_soft_matching(metric: Array, r: int, num_prefix_tokens: int
                            ) -> tuple[Array, Array, Array]:
  """ToMe's matching of the A tokens (even positions) to the B tokens (odd positions).

  Args:
    metric: ``[batch, tokens, dim]``, the keys averaged over heads.
    r: how many A tokens to merge (already clamped to what A can give).
    num_prefix_tokens: protected tokens at the front (class at 0, distillation at 1).

  Returns:
    ``(kept, src, dst)``: indices into A of the tokens that stay (ascending, so the
    class token stays first), of the ``r`` merged ones, and of each one's partner in B.
  """
  metric = metric.astype(jnp.float32)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  a, b = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum("bic,bjc->bij", a, b)
  # Protected A tokens (rows) never merge; nothing merges into protected B tokens.
  scores = scores.at[:, :(num_prefix_tokens + 1) // 2, :].set(-jnp.inf)
  scores = scores.at[:, :, :num_prefix_tokens // 2].set(-jnp.inf)
  best, partner = scores.max(axis=-1), scores.argmax(axis=-1)
  order = jnp.argsort(-best, axis=-1)  # most similar first; protected rows last
  src = order[:, :r]
  kept = jnp.sort(order[:, r:], axis=-1)
  dst = jnp.take_along_axis(partner, src, axis=-1)
  return kept, src, dst


def _merge_sum(x: Array, kept: Array, src: Array, dst: Array,
               num_prefix_tokens: int) -> Array:
  """Adds each merged A token into its B partner; ``[B, N, ...] -> [B, N - r, ...]``."""
  a, b = x[:, ::2], x[:, 1::2]
  take = lambda t, idx: jnp.take_along_axis(
      t, idx.reshape(idx.shape + (1,) * (t.ndim - 2)), axis=1)
  rows = jnp.arange(x.shape[0])[:, None]
  b = b.at[rows, dst].add(take(a, src))
  kept = take(a, kept)
  if num_prefix_tokens == 2:  # class (first of A), distillation (first of B), the rest
    return jnp.concatenate([kept[:, :1], b[:, :1], kept[:, 1:], b[:, 1:]], axis=1)
  return jnp.concatenate([kept, b], axis=1)


def merge_tokens(x: Array, size: Array, source: Optional[Array], keys: Array, r: int,
                 num_prefix_tokens: int) -> tuple[Array, Array, Optional[Array]]:
  """One ToMe step: ``x`` ``[B, N, D]`` -> ``[B, N - r', D]``, sizes and sources too.

  ``keys`` are the block's attention keys ``[B, N, heads, head_dim]``; ``r' = min(r,
  (N - num_prefix_tokens) // 2)`` (A holds about half the unprotected tokens).
  Features average weighted by ``size``.
  """
  r = min(r, (x.shape[1] - num_prefix_tokens) // 2)
  if r <= 0:
    return x, size, source
  kept, src, dst = bipartite_soft_matching(keys.mean(axis=2), r, num_prefix_tokens)
  merge = lambda t: _merge_sum(t, kept, src, dst, num_prefix_tokens)
  weight = size.astype(x.dtype)[..., None]
  new_size = merge(size)
  x = merge(x * weight) / new_size.astype(x.dtype)[..., None]
  return x, new_size, None if source is None else merge(source)


def class_attention(query: Array, key: Array, num_prefix_tokens: int) -> Array:
  """The class token's softmax attention to each patch token, mean over heads: ``[B, n]``."""
  q = query[:, 0].astype(jnp.float32) * query.shape[-1] ** -0.5
  weights = jax.nn.softmax(jnp.einsum("bhd,bkhd->bhk", q, key.astype(jnp.float32)), -1)
  return weights.mean(axis=1)[:, num_prefix_tokens:]


def keep_and_fuse(x: Array, size: Array, source: Optional[Array], attention: Array,
                  keep_rate: float, num_prefix_tokens: int
                  ) -> tuple[Array, Array, Optional[Array]]:
  """One EViT step: keep ``ceil(keep_rate * n)`` patch tokens, fuse the rest into one.

  ``attention`` is ``class_attention`` ``[B, n]`` over the ``n`` patch tokens (a fused
  token from an earlier block counts as one). The kept tokens stay in input order;
  the fused token, ``sum(attention * token)`` over the others, goes last.
  """
  p = num_prefix_tokens
  n = x.shape[1] - p
  keep = math.ceil(keep_rate * n)
  if keep >= n:
    return x, size, source
  order = jnp.argsort(-attention, axis=-1)
  kept, fused = jnp.sort(order[:, :keep], axis=-1), order[:, keep:]
  weight = jnp.take_along_axis(attention, fused, axis=-1)

  def reduce(t, weight):
    idx = lambda i: i.reshape(i.shape + (1,) * (t.ndim - 2))
    patches = t[:, p:]
    others = jnp.take_along_axis(patches, idx(fused), axis=1)
    return jnp.concatenate([t[:, :p], jnp.take_along_axis(patches, idx(kept), axis=1),
                            jnp.sum(others * idx(weight), axis=1, keepdims=True)], axis=1)

  x = reduce(x, weight.astype(x.dtype))
  ones = jnp.ones_like(weight)  # sizes and sources add up: the fused token holds all
  return (x, reduce(size, ones.astype(size.dtype)),
          None if source is None else reduce(source, ones.astype(source.dtype)))


def pruning_keep_counts(token_pruning: float, num_stages: int, num_patches: int
                        ) -> tuple[int, ...]:
  """DynamicViT's static counts: stage ``s`` (1-based) keeps ``int(rho**s * n)``
  of the ``n`` input patch tokens, as the published code rounds them."""
  ratios = [token_pruning ** s for s in range(1, num_stages + 1)]
  counts = tuple(int(num_patches * ratio) for ratio in ratios)
  if counts and counts[-1] < 1:
    raise ValueError(f"token_pruning={token_pruning} over {num_stages} pruning layers "
                     f"keeps int({token_pruning}**{num_stages} * {num_patches}) = 0 of the "
                     f"{num_patches} patch tokens in the last: raise token_pruning or use "
                     "fewer token_pruning_layers")
  return counts


class ScorePredictor(nn.Module):
  """DynamicViT's prediction module (the paper's PredictorLG).

  ``(patch tokens [B, n, D], policy [B, n])`` -> log-probabilities ``[B, n, 2]`` of
  (keep, drop). Each token's features are split in half: a local half, and a global
  half replaced by its mean over the live tokens (``policy`` 1; in training the
  earlier stages' marks). LayerNorm epsilon 1e-5 and exact GELU, as published.
  """
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, policy: Array) -> Array:
    dim = x.shape[-1]
    dense = lambda features, name: layers.Dense(features, dtype=self.dtype,
                                                param_dtype=self.param_dtype, name=name)
    x = layers.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    x = layers.gelu(dense(dim, "Dense_0")(x))
    weight = policy.astype(x.dtype)[..., None]
    local, whole = x[..., :dim // 2], x[..., dim // 2:]
    whole = (whole * weight).sum(axis=1, keepdims=True) / weight.sum(axis=1, keepdims=True)
    x = jnp.concatenate([local, jnp.broadcast_to(whole, local.shape[:2] + whole.shape[2:])],
                        axis=-1)
    x = layers.gelu(dense(dim // 2, "Dense_1")(x))
    x = layers.gelu(dense(dim // 4, "Dense_2")(x))
    return jax.nn.log_softmax(dense(2, "Dense_3")(x).astype(jnp.float32), axis=-1)


def keep_top(x: Array, size: Array, source: Optional[Array], scores: Array, keep: int,
             num_prefix_tokens: int) -> tuple[Array, Array, Optional[Array]]:
  """DynamicViT at inference: the ``keep`` patch tokens of highest ``scores`` ``[B, n]``.

  Kept tokens stay in input order (the published code orders them by score; the class
  token's output does not depend on the order of the others).
  """
  p = num_prefix_tokens
  if keep >= x.shape[1] - p:
    return x, size, source
  kept = jnp.sort(jnp.argsort(-scores, axis=-1)[:, :keep], axis=-1)

  def select(t):
    idx = kept.reshape(kept.shape + (1,) * (t.ndim - 2))
    return jnp.concatenate([t[:, :p], jnp.take_along_axis(t[:, p:], idx, axis=1)], axis=1)
  return select(x), select(size), None if source is None else select(source)


def keep_ratio_loss(keep: Array, target: float) -> Array:
  """DynamicViT's keep-ratio loss of one stage: ``mean_b (mean_n keep - target)**2``,
  the per-image keep ratio against ``target`` (``rho**s``), as the published
  ``DistillDiffPruningLoss_dynamic`` (``dynamic=False``) computes it. ``keep``
  ``[B, n]``: the stage's cumulative marks over the input patch tokens."""
  return jnp.mean((keep.astype(jnp.float32).mean(axis=-1) - target) ** 2)


def gumbel_keep(rng: Array, log_probs: Array) -> Array:
  """A hard Gumbel-softmax sample (temperature 1) of "keep", ``[B, n]`` in {0, 1}, with
  the soft sample's gradient (straight-through), as ``F.gumbel_softmax(hard=True)``."""
  gumbel = jax.random.gumbel(rng, log_probs.shape, jnp.float32)
  soft = jax.nn.softmax(log_probs + gumbel, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft)[..., 0]


def policy_attention(query: Array, key: Array, value: Array, policy: Array,
                     eps: float = 1e-6) -> Array:
  """DynamicViT's training attention: keys with ``policy`` 0 (dropped) are ignored,
  except by their own query, with the published ``eps`` smoothing.

  ``query``/``key``/``value`` ``[B, N, heads, head_dim]``, ``policy`` ``[B, N]``.
  The policy multiplies the weights (so its straight-through gradient reaches the
  predictor), which a ``log(policy)`` bias could not do.
  """
  n = key.shape[1]
  dtype = query.dtype
  logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32),
                      key.astype(jnp.float32)) * query.shape[-1] ** -0.5
  allowed = policy.astype(jnp.float32)[:, None, None, :]
  allowed = allowed + (1.0 - allowed) * jnp.eye(n, dtype=jnp.float32)
  weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True)) * allowed
  weights = (weights + eps / n) / (weights.sum(axis=-1, keepdims=True) + eps)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(jnp.float32)).astype(dtype)
