"""TFDS input pipelines: a deterministic, resumable training stream and padded eval.

Training stream: the split is read as ``S`` equal shards (``num_shards``, by default
one per process), and each shard is a stream of its own::

  epoch e = the shard's records in an order drawn from (seed, shard, e)
  stream  = epoch 0, epoch 1, ...
  example k of shard s gets the preprocessing seed (seed, k * S + s)

so each stream is a pure function of the seed and the position. Datasets prepared as
ArrayRecord files (TFDS's ``file_format="array_record"``; the offline builders are)
are read by index: epoch e is a permutation of the shard, and resuming at position
``n`` starts reading at record ``order_e[n % len(shard)]``, in O(1) of ``n``; the
records of a chunk are read from their files in parallel. Datasets with TFRecord files
only are read in sequence, shuffled by a buffer, and a resume re-reads the records it
skips (a warning names the ``tfds build`` command that writes ArrayRecord files).

Each process reads only its own contiguous share of the shards (one shard, by default:
``tfds.split_for_jax_process``), and a global batch is the concatenation of equal parts
of every shard, in order. The global batches therefore depend on ``S``, not on the
number of processes: with the same ``num_shards``, one process reproduces a
multi-host run and a run resumes on another number of hosts.

Decoding and preprocessing run in tf.data's parallel map (``threads`` CPU threads)
with the order kept, so the batches do not depend on thread timing.

Evaluation reads each process's slice once, in order, padded with masked examples to
the same number of batches on every process, so every example counts exactly once.
"""

import collections
import difflib
import math
import os
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import preprocess
from vit_jax.data.digits import Digits, DigitScenes

# Builders that need no network: prepared automatically on first use.
OFFLINE_BUILDERS = {"digits": Digits, "digit_scenes": DigitScenes}
# Keys a pipeline delivers to the model; preprocessing may add more, they are dropped.
MODEL_KEYS = ("image", "label")
# The naflex pp op's outputs (``vit_jax.models.naflex.INPUT_KEYS``, not imported:
# the data package does not import models).
NAFLEX_KEYS = ("patches", "segment_ids", "positions", "grid_sizes")
# Keys of a batch that stay on the host (``device_batches``): ``data.packing``'s count
# of the images in a batch of packs.
HOST_KEYS = ("_examples",)
# Records per read from ArrayRecord files (one hand-over to tf.data).
CHUNK = 256


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
    if builder.name in OFFLINE_BUILDERS:  # random access: O(1) resume
      builder.download_and_prepare(file_format="array_record")
    elif download:
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


def _decoders(builder) -> dict:
  if "image" in builder.info.features and isinstance(builder.info.features["image"],
                                                     tfds.features.Image):
    return {"image": tfds.decode.SkipDecoding()}  # decode is a preprocessing op
  return {}


def _as_dataset(builder, split: str) -> tf.data.Dataset:
  """The encoded examples of a TFRecord dataset, in file order."""
  read_config = tfds.ReadConfig(shuffle_seed=0, add_tfds_id=False)
  return builder.as_dataset(split=split, shuffle_files=False, decoders=_decoders(builder),
                            read_config=read_config)


def record_source(builder, split: str):
  """Random access to the serialized records of ``split``; None without ArrayRecord files."""
  formats = {builder.info.file_format, *builder.info.alternative_file_formats}
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
    return None
  return builder.as_data_source(split, file_format="array_record",
                                deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def _read(source, indices: np.ndarray) -> list[bytes]:
  indices = indices.tolist()
  if hasattr(source, "__getitems__"):  # ArrayRecord: the files are read in parallel
    return source.__getitems__(indices)
  return [source[i] for i in indices]


def _records(builder, source, chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
             ) -> tf.data.Dataset:
  """``(position, example)`` from ``chunks()``'s ``(positions, record indices)`` pairs.

  The reading thread only fetches bytes; deserializing is a map, like decoding.
  """
  def generate():
    for positions, indices in chunks():
      yield positions, np.asarray(_read(source, indices), dtype=object)

  ds = tf.data.Dataset.from_generator(generate, output_signature=(
      tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string))).unbatch()
  features, decoders = builder.info.features, _decoders(builder)
  return ds.map(lambda position, record: (
      position, features.deserialize_example(record, decoders=decoders)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _in_order(size: int) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
  def chunks():
    for start in range(0, size, CHUNK):
      indices = np.arange(start, min(start + CHUNK, size))
      yield indices, indices
  return chunks


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


def dataset_options(threads: Optional[int] = None) -> tf.data.Options:
  """Deterministic order, ``threads`` CPU threads (None: one per core)."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = threads or max(os.cpu_count() or 1, 2)
  # Parallelism comes from the maps' many examples; ops inside one stay on one thread.
  # (This alone left work on TensorFlow's intra-op pool; vit_jax.data sizes it to one.)
  options.threading.max_intra_op_parallelism = 1
  return options


def _model_keys(example: dict) -> dict:
  if "image" not in example and all(k in example for k in NAFLEX_KEYS):
    # After the naflex pp op the image is its dict of patch inputs (a pack of one),
    # which a NaFlex model (``model.naflex``) reads; ``data.packing`` packs several.
    example = {**example, "image": {k: example[k] for k in NAFLEX_KEYS}}
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


def _kept_indices(builder, source, keep_labels) -> np.ndarray:
  """Indices of the records whose label is kept (reads every record once)."""
  ds = _records(builder, source, _in_order(len(source)))
  ds = ds.map(lambda _, ex: ex["label"], num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True).batch(4096)
  labels = np.concatenate(list(ds.as_numpy_iterator()))
  return np.flatnonzero(np.isin(labels, [int(c) for c in keep_labels]))


def make_train_dataset(builder, split: str, *, preprocess_fn: Callable, batch_size: int,
                       seed: int, start_position: int = 0, shuffle_buffer: int = 50_000,
                       cache: bool = False, num_shards: Optional[int] = None,
                       keep_labels: Optional[list[int]] = None,
                       threads: Optional[int] = None) -> tf.data.Dataset:
  """Infinite batches of this process's shards, starting at example ``start_position``.

  Args:
    batch_size: the per-process batch.
    start_position: examples this process consumed before (resume point).
    shuffle_buffer: the shuffle buffer of TFRecord datasets (ArrayRecord datasets are
      permuted whole).
    cache: keep the encoded records in memory (small datasets).
    num_shards: shards the split is read as (a multiple of the process count;
      default: the process count). See the module docstring.
    keep_labels: train on these classes only, relabelled 0..len-1 in this order
      (fine-tuning on a class subset). Each shard's labels are read once to keep the
      stream positions, and so the resume point, exact.
    threads: tf.data's CPU threads (None: one per core).
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
  table = None if keep_labels is None else _label_table(keep_labels)
  start = start_position // per_process  # examples each shard gave before

  def permuted(shard: int, source) -> tf.data.Dataset:
    """ArrayRecord: epoch e reads the shard in a permutation drawn from (seed, shard, e)."""
    indices = np.arange(len(source))
    if keep_labels is not None:
      indices = _kept_indices(builder, source, keep_labels)
    if cache:
      source = _read(source, np.arange(len(source)))
    size = len(indices)
    if size == 0:
      raise DatasetError(f"shard {shard} of split {split!r} holds none of the labels "
                         f"{keep_labels}")

    def chunks():
      epoch, offset = divmod(start, size)
      while True:
        order = indices[np.random.default_rng([seed, shard, epoch]).permutation(size)]
        for begin in range(offset, size, CHUNK):
          end = min(begin + CHUNK, size)
          yield np.arange(epoch * size + begin, epoch * size + end), order[begin:end]
        epoch, offset = epoch + 1, 0

    return _records(builder, source, chunks)

  def streamed(shard: int) -> tf.data.Dataset:
    """TFRecord: each epoch through a shuffle buffer; a resume skips records."""
    base = _as_dataset(builder, shard_splits[shard])
    size = builder.info.splits[shard_splits[shard]].num_examples
    if keep_labels is not None:
      base = base.filter(lambda ex: _remap_label(ex, table)["label"] >= 0)
      size = int(base.reduce(np.int64(0), lambda n, _: n + 1))
      if size == 0:
        raise DatasetError(f"shard {shard} of split {split!r} holds none of the labels "
                           f"{keep_labels}")
    if cache:
      base = base.cache()
    start_epoch, offset = divmod(start, size)
    if offset:
      logging.warning("%s has no ArrayRecord files: resuming re-reads %d records. Write "
                      "them with `tfds build %s --file_format=array_record`.",
                      builder.name, offset, builder.name)

    def epoch(e):
      return base.shuffle(shuffle_buffer, seed=seed * 1_000_003 + e,
                          reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
    return ds.enumerate(start=start)

  def shard_stream(shard: int) -> tf.data.Dataset:
    if builder.info.splits[shard_splits[shard]].num_examples == 0:
      raise DatasetError(f"split {split!r} of {builder.name!r} is too small for "
                         f"{num_shards} shards")
    source = record_source(builder, shard_splits[shard])
    ds = streamed(shard) if source is None else permuted(shard, source)

    def process(position, example):
      if table is not None:
        example = _remap_label(example, table)
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
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options(threads))


def make_eval_dataset(builder, split: str, *, preprocess_fn: Callable, batch_size: int,
                      cache: bool = True, keep_labels: Optional[list[int]] = None,
                      threads: Optional[int] = None) -> tuple[tf.data.Dataset, int]:
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
  local = slices[jax.process_index()]
  source = record_source(builder, local)
  if source is None:
    ds = _as_dataset(builder, local)
  else:
    ds = _records(builder, source, _in_order(len(source))).map(lambda _, ex: ex)
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
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options(threads)), num_batches


def device_batches(dataset, sharding: jax.sharding.Sharding,
                   prefetch: int = 2) -> Iterator[Any]:
  """Global device arrays assembled from each process's batches, ``prefetch`` ahead.

  ``dataset``: a tf.data.Dataset or an iterator of numpy batches (``data.packing``'s).
  Device transfers are asynchronous, so keeping a couple of batches in flight hides
  the host-to-device copy behind the running step. ``HOST_KEYS`` stay numpy.
  """
  queue = collections.deque()

  def put(batch):
    host = {k: batch[k] for k in HOST_KEYS if k in batch}
    device = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                          {k: v for k, v in batch.items() if k not in host})
    return {**device, **host}

  iterator = (iter(tfds.as_numpy(dataset)) if isinstance(dataset, tf.data.Dataset)
              else iter(dataset))
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
