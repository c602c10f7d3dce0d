"""Early-exit evaluation: top-1 and mean GFLOPs per image at each confidence threshold.

An image leaves at the first exit whose top softmax probability reaches the threshold,
else at the final head (``exit_decisions``); leaving at exit ``k`` costs ``gflops[k]``
(``models.early_exit.exit_gflops``: the final head last). A threshold above 1 is the
full model. As ``classification``'s evaluator, every process evaluates its slice and the
padded examples (``_mask`` False) count nowhere: the sums are reduced on device, so the
numbers are exact whatever the batch size or process count.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.data import input_pipeline


def exit_decisions(logits, thresholds) -> jax.Array:
  """``logits [num_exits + 1, B, C]`` (the final head last), ``thresholds [T]`` -> the
  exit each image takes at each threshold, ``[T, B]``: the first exit whose top
  probability is at least the threshold, the final head otherwise."""
  confidence = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:-1].max(axis=-1)
  confident = confidence[None] >= jnp.asarray(thresholds, jnp.float32)[:, None, None]
  confident = jnp.concatenate([confident, jnp.ones_like(confident[:, :1])], axis=1)
  return jnp.argmax(confident, axis=1)  # the first True along the exits


def curve_sums(logits, labels, mask, thresholds, gflops) -> dict:
  """Sums over real examples at each threshold: hits, GFLOPs and images per exit taken;
  each exit's own hits (every image through it) and the count."""
  mask = mask.astype(jnp.float32)
  taken = exit_decisions(logits, thresholds)  # [T, B]
  correct = (jnp.argmax(logits, -1) == labels[None]).astype(jnp.float32)  # [E + 1, B]
  hit = jnp.take_along_axis(correct[None], taken[:, None], axis=1)[:, 0]  # [T, B]
  cost = jnp.asarray(gflops, jnp.float32)[taken]
  share = jax.nn.one_hot(taken, logits.shape[0]) * mask[None, :, None]
  return {"hits": jnp.sum(hit * mask, axis=1), "gflops": jnp.sum(cost * mask, axis=1),
          "exit_count": jnp.sum(share, axis=1), "exit_hits": jnp.sum(correct * mask, 1),
          "count": jnp.sum(mask)}


def curve(totals: dict, thresholds: Sequence[float]) -> dict:
  """The per-threshold rows and each exit's accuracy from summed ``curve_sums``."""
  totals = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(totals))
  count = max(float(totals["count"]), 1.0)
  rows = [{"threshold": float(t), "accuracy": float(totals["hits"][k] / count),
           "gflops": float(totals["gflops"][k] / count),
           "exit_share": [float(x / count) for x in totals["exit_count"][k]]}
          for k, t in enumerate(thresholds)]
  return {"curve": rows, "exit_accuracy": [float(x / count) for x in totals["exit_hits"]],
          "count": int(count)}


class EarlyExitEvaluator:
  """Runs ``predict_fn(variables, images) -> logits [num_exits + 1, B, C]`` over a TFDS
  split; ``run`` returns the curve (``curve``) at ``thresholds``."""

  def __init__(self, predict_fn: Callable, builder, split: str, *, preprocess_fn: Callable,
               batch_size: int, sharding, gflops: Sequence[float],
               thresholds: Sequence[float], cache: bool = True):
    self.split = split
    self.thresholds = tuple(float(t) for t in thresholds)
    self.gflops = tuple(float(g) for g in gflops)
    self._dataset, self.num_batches = input_pipeline.make_eval_dataset(
        builder, split, preprocess_fn=preprocess_fn,
        batch_size=input_pipeline.local_batch_size(batch_size), cache=cache)
    self._sharding = sharding

    @jax.jit
    def eval_step(variables, batch):
      logits = predict_fn(variables, batch["image"])
      return curve_sums(logits, batch["label"], batch["_mask"], self.thresholds,
                        self.gflops)

    self._eval_step = eval_step

  def run(self, variables: Any) -> dict:
    totals = None
    for batch in input_pipeline.device_batches(self._dataset, self._sharding):
      sums = self._eval_step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {**curve(totals, self.thresholds), "gflops": list(self.gflops)}
