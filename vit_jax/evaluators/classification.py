"""Classification evaluation: top-1, top-5 and loss over a whole split.

Every process evaluates its own slice; the padded examples carry ``_mask = False`` and
count nowhere, so the numbers are exact whatever the batch size or process count.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.data import input_pipeline


def classification_sums(logits, labels, mask):
  """Sums over real examples: cross-entropy, top-1 and top-5 hits, and the count."""
  mask = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = (jnp.argmax(logits, -1) == labels)
  k = min(5, logits.shape[-1])
  topk = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(top1 * mask),
          "top5": jnp.sum(topk * mask), "count": jnp.sum(mask)}


class ClassificationEvaluator:
  """Runs ``predict_fn(variables, images) -> logits`` over a TFDS split."""

  def __init__(self, predict_fn: Callable, builder, split: str, *,
               preprocess_fn: Callable, batch_size: int, sharding, cache: bool = True,
               keep_labels=None):
    self.split = split
    self._dataset, self.num_batches = input_pipeline.make_eval_dataset(
        builder, split, preprocess_fn=preprocess_fn,
        batch_size=input_pipeline.local_batch_size(batch_size), cache=cache,
        keep_labels=keep_labels)
    self._sharding = sharding
    image_spec = self._dataset.element_spec["image"]  # NHWC, or the naflex op's dict
    # One example's inputs (batch 1): the trainer checks the model takes them.
    self.image_spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        (1,) + tuple(s.shape[1:]), jnp.float32 if s.dtype.is_floating
        else s.dtype.as_numpy_dtype), image_spec)
    self.image_shape = (tuple(image_spec.shape[1:]) if hasattr(image_spec, "shape")
                        else None)

    @jax.jit
    def eval_step(variables, batch):
      logits = predict_fn(variables, batch["image"])
      # A NaFlex model gives [batch, 1, classes] for packs of one image (naflex op).
      logits = logits.reshape(batch["label"].shape + logits.shape[-1:])
      return classification_sums(logits, batch["label"], batch["_mask"])

    self._eval_step = eval_step

  def first_images(self, count: int) -> np.ndarray:
    """The first ``count`` preprocessed images of the split (this process's part)."""
    batch = next(iter(self._dataset.take(1).as_numpy_iterator()))
    return batch["image"][:count]

  def run(self, variables: Any) -> dict[str, float]:
    totals = None
    for batch in input_pipeline.device_batches(self._dataset, self._sharding):
      sums = self._eval_step(variables, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.tree.map(lambda x: float(np.asarray(x)), jax.device_get(totals))
    count = max(totals["count"], 1.0)
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
            "loss": totals["loss"] / count, "count": int(totals["count"])}
