"""Helpers the image-text evaluators share: embedding functions, host gathering, data,
evaluating a trained workdir."""

import math
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np

from vit_jax import sharding, workdir
from vit_jax.data import image_text


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def same_on_all_processes_max(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def embedding_fns(model) -> tuple[Callable, Callable]:
  """Jitted ``(variables, images) -> zimg`` and ``(variables, texts) -> ztxt``."""
  @jax.jit
  def encode_images(variables, images):
    return model.apply(variables, images=images)[0]

  @jax.jit
  def encode_texts(variables, texts):
    return model.apply(variables, texts=texts)[1]

  return encode_images, encode_texts


def shard_eval_batches(shards, *, preprocess_fn: Callable, global_batch: int,
                       tokenizer=None, label_key: Optional[str] = None,
                       stats: Optional[image_text.SkipStats] = None
                       ) -> Callable[[], Iterator[dict]]:
  """A factory of this process's padded eval batches over ``shards``.

  Every process gets the same number of batches (from the samples its shards hold,
  counted from the tar headers), so the jitted steps line up across hosts.
  """
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f"eval batch size {global_batch} is not divisible by the {count} "
                     "processes")
  local_batch = global_batch // count
  local = shards[jax.process_index()::count]
  num_batches = same_on_all_processes_max(
      math.ceil(image_text.count_samples(local) / local_batch)) if count > 1 else None

  def batches():
    return image_text.make_eval_batches(
        shards, preprocess_fn=preprocess_fn, batch_size=local_batch, tokenizer=tokenizer,
        label_key=label_key, process_index=jax.process_index(), process_count=count,
        num_batches=num_batches, stats=stats)

  return batches


def cached(factory: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
  """Reads the batches once and replays them from memory (small eval sets)."""
  store = []

  def batches():
    if not store:
      store.extend(factory())
    return iter(store)

  return batches


def evaluate_workdir(from_config: Callable, path: str, settings: dict, *,
                     batch_size: int) -> dict:
  """An evaluator (``from_config`` of zero_shot/retrieval) on a contrastive workdir.

  ``settings`` is the evaluator's config entry (``pp`` defaults to the run's
  ``pp_eval``). Runs over every device; returns the result and the checkpoint's step.
  """
  trained = workdir.load_trained(path)
  eval_config = ml_collections.ConfigDict({**settings,
                                           "pp": settings.get("pp") or trained.pp_eval})
  mesh = sharding.make_mesh({"data": -1})
  evaluator = from_config(eval_config, trained.model, trained.tokenizer,
                          sharding=sharding.batch_sharding(mesh), batch_size=batch_size)
  with jax.set_mesh(mesh):
    result = evaluator.run(trained.variables)
  return {"step": trained.step, **result}
