"""Early exits for a plain ViT (LGViT, Xu et al., 2023: exit heads after chosen blocks,
trained by self-distillation from the final head with the backbone frozen).

The exits read the per-block tokens the ViT already sows (``Transformer/block_{i}``,
``models.forward_intermediates``), so the backbone is the unchanged model and its
checkpoint. ``ExitHeads`` holds one plain head per exit (LayerNorm, class token or
mean, Dense; LGViT's local-perception and global-aggregation heads are not built).

At inference an image leaves at the first exit whose top softmax probability reaches
a threshold, else at the final head (``exit_decisions``); an exit after block ``i``
costs the forward pass of the first ``i + 1`` blocks plus a head, which is exactly the
model with ``num_layers=i + 1`` (``exit_gflops`` measures it with XLA's cost analysis).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import losses
from vit_jax.models import layers

Array = Any


def check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
  exits = tuple(int(i) for i in exit_layers)
  if not exits or list(exits) != sorted(set(exits)) or exits[0] < 0 or (
      exits[-1] >= num_layers - 1):
    raise ValueError(f"exit_layers={list(exit_layers)}: need increasing block indices "
                     f"in [0, {num_layers - 2}] (the last block has the model's own head)")
  return exits


class ExitHeads(nn.Module):
  """``{block index: tokens [B, T, D]}`` -> logits ``[num_exits, B, num_classes]``."""
  exit_layers: Sequence[int]
  num_classes: int
  pool: str = "token"  # the ViT's classifier: "token" (class token) or "gap"

  @nn.compact
  def __call__(self, block_tokens: dict) -> Array:
    logits = []
    for i in self.exit_layers:
      x = nn.LayerNorm(epsilon=1e-6, name=f"exit_{i}_norm")(block_tokens[i])
      x = x[:, 0] if self.pool == "token" else jnp.mean(x, axis=1)
      logits.append(nn.Dense(self.num_classes, kernel_init=layers.head_init(True),
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


def block_tokens(intermediates: dict, exit_layers: Sequence[int]) -> dict:
  """The sown ``Transformer/block_{i}`` tokens of ``forward_intermediates``."""
  return {i: intermediates[f"Transformer/block_{i}"] for i in exit_layers}


def exit_decisions(probs: np.ndarray, threshold: float) -> np.ndarray:
  """``probs [num_exits + 1, B, C]`` (the final head last) -> the exit each image takes:
  the first whose top probability is at least ``threshold`` (the final one otherwise)."""
  confident = probs[:-1].max(axis=-1) >= threshold  # [num_exits, B]
  confident = np.concatenate([confident, np.ones_like(confident[:1])], axis=0)
  return np.argmax(confident, axis=0)


def threshold_curve(probs: np.ndarray, labels: np.ndarray, gflops: Sequence[float],
                    thresholds: Sequence[float]) -> list[dict]:
  """Accuracy and mean GFLOPs per image at each threshold (``gflops[k]``: the cost of
  leaving at exit ``k``, the full model last)."""
  rows = []
  correct = probs.argmax(-1) == labels[None]  # [num_exits + 1, B]
  for t in thresholds:
    taken = exit_decisions(probs, t)
    rows.append({"threshold": float(t),
                 "accuracy": float(np.mean(correct[taken, np.arange(labels.size)])),
                 "gflops": float(np.mean(np.asarray(gflops)[taken])),
                 "exit_share": np.bincount(taken, minlength=len(gflops)) / labels.size})
  return rows


def exit_gflops(model_name: str, exit_layers: Sequence[int], **settings) -> list[float]:
  """GFLOPs per image of leaving at each exit, then of the full model."""
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  costs = [benchmark.forward_gflops_per_image(model_name, **{**settings,
                                                             "num_layers": i + 1})
           for i in exit_layers]
  return costs + [benchmark.forward_gflops_per_image(model_name, **settings)]


__all__ = ["ExitHeads", "check_exit_layers", "exit_loss", "block_tokens", "exit_decisions",
           "threshold_curve", "exit_gflops"]
