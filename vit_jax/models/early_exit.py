"""Early exits for a plain ViT (LGViT, Xu et al., 2023: "LGViT: Dynamic Early Exiting
for Accelerating Vision Transformer"): exit heads after chosen blocks, trained in two
stages (``tools/early_exit.py``): end to end with the backbone (``stage1_loss``), then
by self-distillation from the final head with the backbone frozen (``exit_loss``).

The exits read the per-block tokens the ViT already sows (``Transformer/block_{i}``,
``models.forward_intermediates``), so the backbone is the unchanged model and its
checkpoint. ``ExitHeads`` holds one head per exit, each of a kind (``HEAD_KINDS``):
``plain`` (LayerNorm, class token or mean, Dense), LGViT's ``local`` perception head
(the patch tokens on their grid through pointwise, 3x3 depthwise and pointwise convs
with a residual, then their mean) and its ``global`` aggregation head (attention
pooling, ``layers.MAPHead``). LGViT's heterogeneous feature distillation of stage 2 is
not built: stage 2 distils predictions only (``losses.distillation_loss``).

At inference an image leaves at the first exit whose top softmax probability reaches
a threshold, else at the final head (``vit_jax.evaluators.early_exit``); an exit after
block ``i`` costs the forward pass of the first ``i + 1`` blocks (the model with
``num_layers=i + 1``) plus every exit head evaluated so far (``exit_gflops``, both by
XLA's cost analysis).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import losses
from vit_jax.models import layers

Array = Any
HEAD_KINDS = ("plain", "local", "global")


def check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
  exits = tuple(int(i) for i in exit_layers)
  if not exits or list(exits) != sorted(set(exits)) or exits[0] < 0 or (
      exits[-1] >= num_layers - 1):
    raise ValueError(f"exit_layers={list(exit_layers)}: need increasing block indices "
                     f"in [0, {num_layers - 2}] (the last block has the model's own head)")
  return exits


def check_exit_heads(exit_heads: Optional[Sequence[str]], exits: Sequence[int]
                     ) -> tuple[str, ...]:
  """One head kind per exit (``None``: all plain)."""
  kinds = ("plain",) * len(exits) if exit_heads is None else tuple(exit_heads)
  bad = [k for k in kinds if k not in HEAD_KINDS]
  if bad or len(kinds) != len(exits):
    raise ValueError(f"exit_heads={list(kinds)}: need one of {list(HEAD_KINDS)} per exit "
                     f"(exit_layers={list(exits)})")
  return kinds


class LocalPerceptionHead(nn.Module):
  """LGViT's local-perception head: tokens ``[B, T, D]`` -> pooled features ``[B, D]``.

  The patch tokens (after ``num_prefix_tokens``) go back on their square grid, where a
  pointwise conv, a 3x3 depthwise conv and a pointwise conv (GELU between, residual
  around) mix each token with its neighbours, which a shallow block has barely done.
  """
  num_prefix_tokens: int
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, tokens, dim = x.shape
    side = math.isqrt(tokens - self.num_prefix_tokens)
    if side * side != tokens - self.num_prefix_tokens:
      raise ValueError(f"exit_heads 'local' needs a square token grid, got "
                       f"{tokens - self.num_prefix_tokens} patch tokens")
    grid = layers.LayerNorm(epsilon=1e-6, name="norm")(
        x[:, self.num_prefix_tokens:].reshape(batch, side, side, dim))
    y = nn.gelu(layers.Dense(dim, name="pointwise_in")(grid))
    y = nn.gelu(layers.DepthwiseConv(dim, (self.kernel_size,) * 2, name="depthwise")(y))
    y = layers.Dense(dim, name="pointwise_out")(y)
    return jnp.mean(grid + y, axis=(1, 2))


class ExitHeads(nn.Module):
  """``{block index: tokens [B, T, D]}`` -> logits ``[num_exits, B, num_classes]``."""
  exit_layers: Sequence[int]
  num_classes: int
  pool: str = "token"  # the ViT's classifier: "token" (class token) or "gap"
  kinds: Optional[Sequence[str]] = None  # one of HEAD_KINDS per exit (None: plain)
  num_heads: int = 1  # of the global heads' attention pooling

  @nn.compact
  def __call__(self, block_tokens: dict) -> Array:
    logits = []
    kinds = check_exit_heads(self.kinds, self.exit_layers)
    prefix = 1 if self.pool == "token" else 0
    for i, kind in zip(self.exit_layers, kinds):
      x = block_tokens[i]
      if kind == "plain":  # the names of the first plain-only heads, kept
        x = layers.LayerNorm(epsilon=1e-6, name=f"exit_{i}_norm")(x)
        x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
      elif kind == "local":
        x = LocalPerceptionHead(prefix, name=f"exit_{i}_local")(x)
        x = layers.LayerNorm(epsilon=1e-6, name=f"exit_{i}_norm")(x)
      else:
        x = layers.LayerNorm(epsilon=1e-6, name=f"exit_{i}_norm")(x)
        x = layers.MAPHead(self.num_heads, name=f"exit_{i}_global")(x)
      logits.append(layers.Dense(self.num_classes, kernel_init=layers.head_init(True),
                                 name=f"exit_{i}_head")(x).astype(jnp.float32))
    return jnp.stack(logits)


def exit_loss(heads, params, tokens: dict, final_logits, labels):
  """Stage 2's loss of the exit heads: each exit's soft distillation from the final
  head (tau 1), averaged over exits, plus the exits' mean cross-entropy on the labels."""
  logits = heads.apply({"params": params}, tokens)  # [num_exits, B, C]
  distill = jnp.mean(jnp.stack([losses.distillation_loss(l, final_logits, "soft", 1.0)
                                for l in logits]))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None]).mean()
  return distill + ce


def stage1_loss(exit_logits, final_logits, labels, weights: Sequence[float]):
  """Stage 1's loss (backbone and exits end to end): the final head's cross-entropy
  plus the exits' cross-entropies weighted by ``weights`` (one per exit)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(
      jnp.concatenate([exit_logits, final_logits[None]]), labels[None]).mean(axis=1)
  return ce[-1] + jnp.sum(jnp.asarray(weights, jnp.float32) * ce[:-1])


def block_tokens(intermediates: dict, exit_layers: Sequence[int]) -> dict:
  """The sown ``Transformer/block_{i}`` tokens of ``forward_intermediates``."""
  return {i: intermediates[f"Transformer/block_{i}"] for i in exit_layers}


def head_gflops(heads: ExitHeads, token_shapes: dict) -> list[float]:
  """GFLOPs per image of each exit head alone (XLA's cost analysis, abstract shapes)."""
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  one = {i: jax.ShapeDtypeStruct((1, *s.shape[1:]), s.dtype)
         for i, s in token_shapes.items()}
  costs = []
  for k, i in enumerate(heads.exit_layers):
    head = heads.clone(exit_layers=(i,), kinds=(check_exit_heads(
        heads.kinds, heads.exit_layers)[k],), parent=None)
    params = jax.eval_shape(head.init, jax.random.key(0), {i: one[i]})
    compiled = jax.jit(head.apply).lower(params, {i: one[i]}).compile()
    costs.append(benchmark.compiled_flops(compiled) / 1e9)
  return costs


def exit_gflops(model_name: str, exit_layers: Sequence[int],
                heads_gflops: Optional[Sequence[float]] = None, **settings) -> list[float]:
  """GFLOPs per image of leaving at each exit, then of the full model: the first
  ``i + 1`` blocks (the truncated model, its own small head included) plus the exit
  heads run so far (``heads_gflops``, one per exit; all of them for the full model)."""
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  heads_gflops = list(heads_gflops or [0.0] * len(exit_layers))
  costs = [benchmark.forward_gflops_per_image(model_name, **{**settings,
                                                             "num_layers": i + 1})
           for i in exit_layers]
  costs.append(benchmark.forward_gflops_per_image(model_name, **settings))
  return [c + sum(heads_gflops[:k + 1]) for k, c in enumerate(costs)]


__all__ = ["HEAD_KINDS", "ExitHeads", "LocalPerceptionHead", "check_exit_layers",
           "check_exit_heads", "exit_loss", "stage1_loss", "block_tokens", "head_gflops",
           "exit_gflops"]
