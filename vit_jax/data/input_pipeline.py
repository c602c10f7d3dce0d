"""TFDS input pipelines: a deterministic, resumable training stream and padded eval.

Training stream, per process::

  epoch e = this process's slice of the split, shuffled with a seed made from (seed, e)
  stream  = epoch 0, epoch 1, ...          (encoded images: skipping them is cheap)
  example k of the stream gets the preprocessing seed (seed, k * processes + process)

so the stream is a pure function of the seed and the position. Resuming at position
``n`` starts at epoch ``n // len(slice)`` and skips ``n % len(slice)`` encoded records,
then continues exactly as an uninterrupted run would. Every process reads only its
own slice (``tfds.split_for_jax_process``).

Evaluation reads each process's slice once, in order, padded with masked examples to
the same number of batches on every process, so every example counts exactly once.
"""

import collections
import difflib
import math
import os
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import preprocess
from vit_jax.data.digits import Digits

# Builders that need no network: prepared automatically on first use.
OFFLINE_BUILDERS = {"digits": Digits}
# Keys a pipeline delivers to the model; preprocessing may add more, they are dropped.
MODEL_KEYS = ("image", "label")


class DatasetError(ValueError):
  """A dataset cannot be found, prepared or read as configured."""


def get_builder(name: str, data_dir: Optional[str] = None, *,
                download: bool = False) -> tfds.core.DatasetBuilder:
  """A prepared TFDS builder; offline builders are prepared on first use."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split(":")[0], known, n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise DatasetError(f"unknown dataset {name!r}.{hint} Use a TFDS name "
                       "(tfds.list_builders()) or an offline builder: "
                       f"{', '.join(OFFLINE_BUILDERS)}.") from None
  if not builder.is_prepared():
    if builder.name in OFFLINE_BUILDERS or download:
      builder.download_and_prepare()
    else:
      raise DatasetError(
          f"dataset {name!r} is not prepared in {builder.data_dir_root}. Prepare it "
          f"with `tfds build {name} --data_dir={builder.data_dir_root}` (some datasets, "
          "like imagenet2012, need a manual download first), or set "
          "config.input.download=True to let TFDS download it.")
  return builder


def _check_split(builder, split: str) -> None:
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise DatasetError(f"dataset {builder.name!r} has no split {split!r} "
                       f"(splits: {', '.join(builder.info.splits)}): {e}") from None


def _as_dataset(builder, split: str) -> tf.data.Dataset:
  decoders = {}
  if "image" in builder.info.features and isinstance(builder.info.features["image"],
                                                     tfds.features.Image):
    decoders["image"] = tfds.decode.SkipDecoding()  # decode is a preprocessing op
  read_config = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1,
                                add_tfds_id=False)
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=read_config)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(os.cpu_count() or 1, 2)
  return options


def _model_keys(example: dict) -> dict:
  missing = [k for k in MODEL_KEYS if k not in example]
  if missing:
    raise DatasetError(f"preprocessed examples lack {missing}; they have "
                       f"{sorted(example)}")
  return {k: example[k] for k in MODEL_KEYS}


def train_split_size(builder, split: str) -> int:
  """Examples in this process's slice of ``split``."""
  _check_split(builder, split)
  return builder.info.splits[tfds.split_for_jax_process(split, drop_remainder=True)
                             ].num_examples


def make_train_dataset(builder, split: str, *, preprocess_fn: Callable, batch_size: int,
                       seed: int, start_position: int = 0, shuffle_buffer: int = 50_000,
                       cache: bool = False) -> tf.data.Dataset:
  """Infinite batches of this process's slice, starting at example ``start_position``.

  Args:
    batch_size: the per-process batch.
    start_position: examples this process consumed before (resume point).
    cache: keep the encoded records in memory (small datasets).
  """
  local_split = tfds.split_for_jax_process(split, drop_remainder=True)
  size = train_split_size(builder, split)
  if size == 0:
    raise DatasetError(f"split {split!r} of {builder.name!r} is empty on this process")
  base = _as_dataset(builder, local_split)
  if cache:
    base = base.cache()
  start_epoch, offset = divmod(start_position, size)
  process_index, process_count = jax.process_index(), jax.process_count()

  def epoch(e):
    return base.shuffle(shuffle_buffer, seed=seed * 1_000_003 + e,
                        reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  ds = ds.enumerate(start=start_position)

  def process(position, example):
    rng = tf.stack([tf.constant(seed, tf.int64),
                    position * process_count + process_index])
    return _model_keys(preprocess_fn({**example, "_rng": rng}))

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def make_eval_dataset(builder, split: str, *, preprocess_fn: Callable, batch_size: int,
                      cache: bool = True) -> tuple[tf.data.Dataset, int]:
  """Batches of this process's slice in order, padded; ``_mask`` marks real examples.

  Returns the dataset and the number of batches (equal on every process).
  """
  _check_split(builder, split)
  count = jax.process_count()
  slices = tfds.even_splits(split, n=count, drop_remainder=False)
  sizes = [builder.info.splits[s].num_examples for s in slices]
  num_batches = math.ceil(max(sizes) / batch_size)
  ds = _as_dataset(builder, slices[jax.process_index()])
  ds = ds.map(lambda ex: {**_model_keys(preprocess_fn(ex)), "_mask": tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      jax.tree.map(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat()).take(num_batches * batch_size)
  ds = ds.batch(batch_size, drop_remainder=True)
  if cache:
    ds = ds.cache()
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options()), num_batches


def device_batches(dataset: tf.data.Dataset, sharding: jax.sharding.Sharding,
                   prefetch: int = 2) -> Iterator[Any]:
  """Global device arrays assembled from each process's batches, ``prefetch`` ahead.

  Device transfers are asynchronous, so keeping a couple of batches in flight hides
  the host-to-device copy behind the running step.
  """
  queue = collections.deque()

  def put(batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                        batch)

  iterator = iter(tfds.as_numpy(dataset))
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def local_batch_size(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch % count:
    raise ValueError(f"batch size {global_batch} is not divisible by the "
                     f"{count} processes")
  return global_batch // count


def check_batch_divisible(global_batch: int, divisor: int, what: str) -> None:
  if global_batch % divisor:
    raise ValueError(f"batch size {global_batch} must be divisible by {what} ({divisor})")


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  return iter(tfds.as_numpy(dataset))
