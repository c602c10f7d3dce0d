"""TFDS input pipelines: a deterministic, resumable training stream and padded eval.

Training stream: the split is read as ``S`` equal shards (``num_shards``, by default
one per process), and each shard is a stream of its own::

  epoch e = the shard, shuffled with a seed made from (seed, e)
  stream  = epoch 0, epoch 1, ...          (encoded images: skipping them is cheap)
  example k of shard s gets the preprocessing seed (seed, k * S + s)

so each stream is a pure function of the seed and the position. Resuming at position
``n`` starts at epoch ``n // len(shard)`` and skips ``n % len(shard)`` encoded records,
then continues exactly as an uninterrupted run would. Each process reads only its own
contiguous share of the shards (one shard, by default: ``tfds.split_for_jax_process``),
and a global batch is the concatenation of equal parts of every shard, in order. The
global batches therefore depend on ``S``, not on the number of processes: with the same
``num_shards``, one process reproduces a multi-host run and a run resumes on another
number of hosts.

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


def _label_table(keep_labels) -> tf.Tensor:
  """Old label -> index in ``keep_labels`` (-1: not kept), as a lookup vector."""
  keep_labels = [int(c) for c in keep_labels]
  if len(set(keep_labels)) != len(keep_labels) or min(keep_labels) < 0:
    raise DatasetError(f"keep_labels must be distinct non-negative labels, got "
                       f"{keep_labels}")
  table = np.full(max(keep_labels) + 1, -1, np.int64)
  table[keep_labels] = np.arange(len(keep_labels))
  return tf.constant(table)


def _remap_label(example: dict, table: tf.Tensor) -> dict:
  label = tf.cast(example["label"], tf.int64)
  size = tf.shape(table, out_type=tf.int64)[0]
  new = tf.where(label < size, tf.gather(table, tf.minimum(label, size - 1)),
                 tf.constant(-1, tf.int64))
  return {**example, "label": tf.cast(new, example["label"].dtype)}


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
                       cache: bool = False, num_shards: Optional[int] = None,
                       keep_labels: Optional[list[int]] = None) -> tf.data.Dataset:
  """Infinite batches of this process's shards, starting at example ``start_position``.

  Args:
    batch_size: the per-process batch.
    start_position: examples this process consumed before (resume point).
    cache: keep the encoded records in memory (small datasets).
    num_shards: shards the split is read as (a multiple of the process count;
      default: the process count). See the module docstring.
    keep_labels: train on these classes only, relabelled 0..len-1 in this order
      (fine-tuning on a class subset). Each shard is counted once to keep the
      stream positions, and so the resume point, exact.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  num_shards = num_shards or process_count
  if num_shards % process_count or batch_size % (num_shards // process_count):
    raise DatasetError(f"num_shards={num_shards} must be a multiple of the {process_count} "
                       f"processes, and the per-process batch {batch_size} a multiple of "
                       "the shards per process")
  per_process = num_shards // process_count
  _check_split(builder, split)
  shard_splits = tfds.even_splits(split, n=num_shards, drop_remainder=True)

  def shard_stream(shard: int) -> tf.data.Dataset:
    size = builder.info.splits[shard_splits[shard]].num_examples
    if size == 0:
      raise DatasetError(f"split {split!r} of {builder.name!r} is too small for "
                         f"{num_shards} shards")
    base = _as_dataset(builder, shard_splits[shard])
    if keep_labels is not None:
      table = _label_table(keep_labels)
      base = base.map(lambda ex: _remap_label(ex, table)).filter(
          lambda ex: ex["label"] >= 0)
      size = int(base.reduce(np.int64(0), lambda n, _: n + 1))
      if size == 0:
        raise DatasetError(f"shard {shard} of split {split!r} holds none of the labels "
                           f"{keep_labels}")
    if cache:
      base = base.cache()
    start = start_position // per_process  # examples this shard gave before
    start_epoch, offset = divmod(start, size)

    def epoch(e):
      return base.shuffle(shuffle_buffer, seed=seed * 1_000_003 + e,
                          reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
    ds = ds.enumerate(start=start)

    def process(position, example):
      rng = tf.stack([tf.constant(seed, tf.int64), position * num_shards + shard])
      return _model_keys(preprocess_fn({**example, "_rng": rng}))

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size // per_process, drop_remainder=True)

  streams = [shard_stream(s) for s in range(process_index * per_process,
                                            (process_index + 1) * per_process)]
  if len(streams) == 1:
    ds = streams[0]
  else:  # this process's part of the global batch: its shards' parts, in order
    ds = tf.data.Dataset.zip(tuple(streams)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def make_eval_dataset(builder, split: str, *, preprocess_fn: Callable, batch_size: int,
                      cache: bool = True, keep_labels: Optional[list[int]] = None
                      ) -> tuple[tf.data.Dataset, int]:
  """Batches of this process's slice in order, padded; ``_mask`` marks real examples.

  With ``keep_labels``, examples of other classes are masked out (so the batch count
  stays equal on every process) and labels are renumbered as in training.

  Returns the dataset and the number of batches (equal on every process).
  """
  _check_split(builder, split)
  count = jax.process_count()
  slices = tfds.even_splits(split, n=count, drop_remainder=False)
  sizes = [builder.info.splits[s].num_examples for s in slices]
  num_batches = math.ceil(max(sizes) / batch_size)
  ds = _as_dataset(builder, slices[jax.process_index()])
  if keep_labels is None:
    ds = ds.map(lambda ex: {**_model_keys(preprocess_fn(ex)), "_mask": tf.constant(True)},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    table = _label_table(keep_labels)

    def subset(ex):
      ex = _model_keys(preprocess_fn(_remap_label(ex, table)))
      kept = ex["label"] >= 0
      return {**ex, "label": tf.maximum(ex["label"], 0), "_mask": kept}

    ds = ds.map(subset, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  return iter(tfds.as_numpy(dataset))
