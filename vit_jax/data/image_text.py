"""Image-text pairs from webdataset-style ``.tar`` shards (img2dataset/DataComp format).

A shard is a plain tar file in which consecutive members sharing a key form a sample::

  000123.jpg    the image (jpg, jpeg, png, webp or bmp)
  000123.txt    the caption, UTF-8
  000123.json   optional metadata (uid, label, ...)

Bad samples never stop a run: an image that does not decode, a sample without caption
or image, or unreadable metadata is skipped and counted (``SkipStats``); the trainer
reports the counts in its logs. A truncated shard yields the samples before the damage.

Training stream, per process (``ImageTextStream``)::

  shards of process p   = shards[p::process_count]
  epoch e               = those shards in an order drawn from (seed, p, e), cut into
                          windows of ``shards_per_window`` consecutive shards
  window w              = every sample of its shards, shuffled with (seed, p, e, w)
  position (e, w, k)    = the next sample is number k of window w of epoch e

Each sample comes with the position after it. The trainer checkpoints the position
of the last sample it consumed, and a resumed stream starts exactly there: nothing is
repeated or skipped, and resuming costs reading one window, not the whole epoch.
Shuffling a whole window (rather than a sliding buffer) is what makes the position a
small exact number.
"""

import collections
import concurrent.futures
import dataclasses
import glob
import io
import json
import os
import re
import tarfile
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
# Warnings naming individual skipped samples stop after this many (the counts go on).
MAX_SKIP_WARNINGS = 20


class DataError(ValueError):
  """Shards cannot be found or read as configured."""


# ---------------------------------------------------------------- shard lists

def _expand_braces(pattern: str) -> list[str]:
  """``pool-{000..002}.tar`` -> three names (webdataset's brace ranges)."""
  match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
  if not match:
    return [pattern]
  first, last = match.group(1), match.group(2)
  width = len(first)
  names = []
  for i in range(int(first), int(last) + 1):
    names += _expand_braces(pattern[:match.start()] + str(i).zfill(width) +
                            pattern[match.end():])
  return names


def expand_shards(spec: Union[str, Sequence[str]]) -> list[str]:
  """Shard files from globs, brace ranges, directories or comma-separated lists.

  Raises DataError if nothing matches (an empty shard list is a configuration error,
  not an empty dataset).
  """
  items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  patterns = [p.strip() for item in items for p in os.fspath(item).split(",") if p.strip()]
  shards = []
  for pattern in patterns:
    for name in _expand_braces(os.path.expanduser(pattern)):
      if os.path.isdir(name):
        found = sorted(glob.glob(os.path.join(name, "*.tar")))
      elif glob.has_magic(name):
        found = sorted(glob.glob(name))
      else:
        if not os.path.exists(name):
          raise DataError(f"shard {name} does not exist (from {pattern!r})")
        found = [name]
      shards += found
  if not shards:
    raise DataError(f"no shards match {spec!r}: give .tar files, a glob such as "
                    "'pool/*.tar', a brace range such as 'pool/{00000..00009}.tar', or a "
                    "directory of .tar files")
  return list(dict.fromkeys(shards))  # keep order, drop repeats


# ---------------------------------------------------------------- reading samples

@dataclasses.dataclass
class RawSample:
  """The undecoded files of one sample: extension -> bytes."""
  key: str
  shard: str
  files: dict


def _split_name(name: str) -> tuple[str, str]:
  """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``): the key ends at the first dot."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower()


class SkipStats:
  """Counts of skipped samples by reason; shared by the reading threads."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()
    self._warned = 0

  def record(self, reason: str, key: str, shard: str, detail: str = "") -> None:
    with self._lock:
      self.counts[reason] += 1
      self._warned += 1
      warn = self._warned <= MAX_SKIP_WARNINGS
    if warn:
      logging.warning("skipped sample %r of %s: %s%s", key, shard, reason.replace("_", " "),
                      f" ({detail})" if detail else "")

  @property
  def total(self) -> int:
    with self._lock:
      return sum(v for k, v in self.counts.items() if k != "truncated_shard")

  def as_dict(self) -> dict[str, int]:
    with self._lock:
      return dict(self.counts)

  def summary(self) -> str:
    counts = self.as_dict()
    if not counts:
      return "no samples skipped"
    parts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items()))
    return f"{self.total} samples skipped ({parts})"


def read_shard(path: str, stats: Optional[SkipStats] = None) -> Iterator[RawSample]:
  """The samples of one shard, in order, undecoded."""
  key, files = None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        name_key, ext = _split_name(member.name)
        if name_key != key and key is not None:
          yield RawSample(key, path, files)
          files = {}
        key = name_key
        files[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    if isinstance(e, FileNotFoundError):
      raise DataError(f"shard {path} does not exist") from e
    if stats is not None:
      stats.record("truncated_shard", key or "-", path, str(e))
    # Everything before the damage is usable; a partial last sample is dropped.
    return
  if key is not None:
    yield RawSample(key, path, files)


def decode_sample(raw: RawSample, stats: Optional[SkipStats] = None,
                  *, decode_image: bool = True) -> Optional[dict]:
  """``{"key", "image" (uint8 HWC RGB), "caption", "meta"}``, or None if unusable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def skip(reason, detail=""):
    if stats is not None:
      stats.record(reason, raw.key, raw.shard, detail)
    return None

  image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw.files), None)
  if image_ext is None:
    return skip("missing_image", f"files: {', '.join(sorted(raw.files)) or 'none'}")
  caption = raw.files.get(CAPTION_EXTENSION)
  if caption is None:
    return skip("missing_caption")
  try:
    caption = caption.decode("utf-8").strip()
  except UnicodeDecodeError as e:
    return skip("bad_caption", str(e))
  if not caption:
    return skip("missing_caption", "empty caption")
  meta = {}
  if META_EXTENSION in raw.files:
    try:
      meta = json.loads(raw.files[META_EXTENSION])
    except ValueError as e:
      return skip("bad_json", str(e))
  sample = {"key": raw.key, "caption": caption, "meta": meta,
            "image_bytes": raw.files[image_ext]}
  if decode_image:
    try:
      with Image.open(io.BytesIO(raw.files[image_ext])) as image:
        sample["image"] = np.asarray(image.convert("RGB"))
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
      return skip("corrupt_image", f"{type(e).__name__}: {e}")
  return sample


def iterate_samples(shards: Sequence[str], *, stats: Optional[SkipStats] = None,
                    decode_image: bool = True, threads: int = 4) -> Iterator[dict]:
  """Every usable sample of ``shards`` once, in order (evaluation, filtering)."""
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    for shard in shards:
      raws = list(read_shard(shard, stats))
      decode = lambda r: decode_sample(r, stats, decode_image=decode_image)
      for sample in pool.map(decode, raws):
        if sample is not None:
          yield sample


def iterate_captions(shards: Sequence[str], limit: Optional[int] = None) -> Iterator[str]:
  count = 0
  for shard in shards:
    for raw in read_shard(shard):
      if CAPTION_EXTENSION in raw.files:
        yield raw.files[CAPTION_EXTENSION].decode("utf-8", errors="replace").strip()
        count += 1
        if limit and count >= limit:
          return


def count_samples(shards: Sequence[str]) -> int:
  """Samples with an image and a caption, from the tar headers (nothing decoded)."""
  total = 0
  for shard in shards:
    for raw in read_shard(shard):
      total += CAPTION_EXTENSION in raw.files and any(e in raw.files
                                                      for e in IMAGE_EXTENSIONS)
  return total


class ShardWriter:
  """Writes samples into numbered shards of ``samples_per_shard`` samples each.

  ``pattern`` has one ``{}`` for the shard number, e.g. ``out/pool-{:05d}.tar``.
  Members get fixed timestamps, so the same samples give byte-identical shards.
  """

  def __init__(self, pattern: str, samples_per_shard: int = 1000):
    if samples_per_shard < 1:
      raise ValueError(f"samples_per_shard={samples_per_shard} must be positive")
    self.pattern = pattern
    self.samples_per_shard = samples_per_shard
    self.paths: list[str] = []
    self.count = 0
    self._tar: Optional[tarfile.TarFile] = None
    os.makedirs(os.path.dirname(os.path.abspath(pattern)) or ".", exist_ok=True)

  def write(self, key: str, files: dict) -> None:
    """``files``: extension -> bytes (or str, encoded as UTF-8)."""
    if self.count % self.samples_per_shard == 0:
      self._close_shard()
      path = self.pattern.format(len(self.paths))
      self.paths.append(path)
      self._tar = tarfile.open(path, "w")
    for ext, data in files.items():
      data = data.encode("utf-8") if isinstance(data, str) else data
      info = tarfile.TarInfo(f"{key}.{ext}")
      info.size, info.mtime, info.mode = len(data), 0, 0o644
      self._tar.addfile(info, io.BytesIO(data))
    self.count += 1

  def _close_shard(self) -> None:
    if self._tar is not None:
      self._tar.close()
      self._tar = None

  def close(self) -> list[str]:
    self._close_shard()
    return self.paths

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------- training stream

@dataclasses.dataclass(frozen=True)
class StreamPosition:
  """Where a process's stream continues: sample ``offset`` of ``window`` of ``epoch``."""
  epoch: int = 0
  window: int = 0
  offset: int = 0

  def to_list(self) -> list[int]:
    return [self.epoch, self.window, self.offset]

  @classmethod
  def from_list(cls, values: Sequence[int]) -> "StreamPosition":
    return cls(*(int(v) for v in values))


def process_shards(shards: Sequence[str], process_index: int, process_count: int
                   ) -> list[str]:
  """The shards one process reads: every ``process_count``-th, from ``process_index``."""
  if len(shards) < process_count:
    raise DataError(f"{len(shards)} shards cannot feed {process_count} processes: every "
                    "process needs at least one shard. Re-shard the data into more "
                    "files (python -m vit_jax.tools.filter_pool --samples_per_shard=...).")
  return list(shards[process_index::process_count])


class ImageTextStream:
  """An endless, shuffled, exactly resumable stream of decoded samples for one process.

  Iterating yields ``(sample, position)``: the decoded sample and the position of the
  stream after it. ``ImageTextStream(..., position=p)`` continues right after the
  sample that returned ``p``.
  """

  def __init__(self, shards: Sequence[str], *, seed: int, process_index: int = 0,
               process_count: int = 1, shards_per_window: int = 4,
               position: Optional[StreamPosition] = None, decode_threads: int = 4,
               stats: Optional[SkipStats] = None):
    if not shards:
      raise DataError("the shard list is empty")
    if shards_per_window < 1:
      raise ValueError(f"shards_per_window={shards_per_window} must be at least 1")
    self.shards = process_shards(list(shards), process_index, process_count)
    self.seed = seed
    self.process_index = process_index
    self.shards_per_window = shards_per_window
    self.position = position or StreamPosition()
    self.decode_threads = decode_threads
    self.stats = stats if stats is not None else SkipStats()

  def windows(self, epoch: int) -> list[list[str]]:
    rng = np.random.default_rng([self.seed, self.process_index, epoch])
    order = [self.shards[i] for i in rng.permutation(len(self.shards))]
    n = self.shards_per_window
    return [order[i:i + n] for i in range(0, len(order), n)]

  def window_samples(self, epoch: int, window: int) -> list[RawSample]:
    """The undecoded samples of a window, in the stream's shuffled order."""
    raws = [raw for shard in self.windows(epoch)[window]
            for raw in read_shard(shard, self.stats)]
    rng = np.random.default_rng([self.seed, self.process_index, epoch, window, 1])
    return [raws[i] for i in rng.permutation(len(raws))]

  def __iter__(self) -> Iterator[tuple[dict, StreamPosition]]:
    epoch, window, offset = (self.position.epoch, self.position.window,
                             self.position.offset)
    chunk = 64
    with concurrent.futures.ThreadPoolExecutor(max(self.decode_threads, 1)) as pool:
      while True:
        yielded, whole_epoch = 0, window == 0 and offset == 0
        num_windows = len(self.windows(epoch))
        for w in range(window, num_windows):
          raws = self.window_samples(epoch, w)
          for start in range(offset, len(raws), chunk):
            batch = raws[start:start + chunk]
            decoded = pool.map(lambda r: decode_sample(r, self.stats), batch)
            for i, sample in enumerate(decoded):
              if sample is not None:
                yielded += 1
                yield sample, StreamPosition(epoch, w, start + i + 1)
          offset = 0
        if yielded == 0 and whole_epoch:
          raise DataError(f"no usable samples in {len(self.shards)} shards "
                          f"({self.stats.summary()}); first shard: {self.shards[0]}")
        epoch, window = epoch + 1, 0


# ---------------------------------------------------------------- tf.data pipelines

def _example_seed(seed: int, process_index: int, position: StreamPosition) -> np.ndarray:
  """A per-sample preprocessing seed that depends only on where the sample is."""
  mixed = np.random.SeedSequence([seed, process_index, *position.to_list()])
  return mixed.generate_state(2, np.uint32).astype(np.int64)


def _apply_pp(preprocess_fn: Callable, example: dict) -> dict:
  """Runs image preprocessing on ``image`` (and ``_rng``); other keys pass through."""
  inputs = {"image": example["image"]}
  if "_rng" in example:
    inputs["_rng"] = example["_rng"]
  out = dict(example)
  out.pop("_rng", None)
  out["image"] = preprocess_fn(inputs)["image"]
  return out


def make_train_dataset(stream: ImageTextStream, *, tokenizer, preprocess_fn: Callable,
                       batch_size: int):
  """tf.data batches ``{"image", "text", "_position", "_key"}`` from a stream.

  ``_position`` of each example is the stream position after it: the last row of a
  batch is where the stream continues after that batch.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def generate():
    for sample, position in stream:
      yield {"image": sample["image"],
             "text": tokenizer.encode([sample["caption"]])[0],
             "_rng": _example_seed(stream.seed, stream.process_index, position),
             "_position": np.asarray(position.to_list(), np.int64),
             "_key": sample["key"]}

  signature = {"image": tf.TensorSpec([None, None, 3], tf.uint8),
               "text": tf.TensorSpec([tokenizer.context_length], tf.int32),
               "_rng": tf.TensorSpec([2], tf.int64),
               "_position": tf.TensorSpec([3], tf.int64),
               "_key": tf.TensorSpec([], tf.string)}
  ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
  ds = ds.map(lambda ex: _apply_pp(preprocess_fn, ex), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def make_eval_batches(shards: Sequence[str], *, preprocess_fn: Callable, batch_size: int,
                      tokenizer=None, label_key: Optional[str] = None,
                      process_index: int = 0, process_count: int = 1,
                      num_batches: Optional[int] = None,
                      stats: Optional[SkipStats] = None) -> Iterator[dict]:
  """This process's samples once, in order, as padded numpy batches with ``_mask``.

  Batches hold ``image``, ``_key``, ``_mask`` and, with a tokenizer, ``text``; with
  ``label_key``, ``label`` from each sample's JSON metadata (samples without it are
  skipped and counted). ``num_batches`` pads with masked batches up to that count, so
  that every process runs the same number of steps.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  stats = stats if stats is not None else SkipStats()
  local = list(shards[process_index::process_count])

  def generate():
    for sample in iterate_samples(local, stats=stats):
      example = {"image": sample["image"], "_key": sample["key"]}
      if tokenizer is not None:
        example["text"] = tokenizer.encode([sample["caption"]])[0]
      if label_key is not None:
        if label_key not in sample["meta"]:
          stats.record("missing_label", sample["key"], "", f"no {label_key!r} in json")
          continue
        example["label"] = np.int32(sample["meta"][label_key])
      yield example

  signature = {"image": tf.TensorSpec([None, None, 3], tf.uint8),
               "_key": tf.TensorSpec([], tf.string)}
  if tokenizer is not None:
    signature["text"] = tf.TensorSpec([tokenizer.context_length], tf.int32)
  if label_key is not None:
    signature["label"] = tf.TensorSpec([], tf.int32)
  ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
  ds = ds.map(lambda ex: _apply_pp(preprocess_fn, ex), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.map(lambda ex: {**ex, "_mask": tf.constant(True)})
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  emitted, template = 0, None
  for batch in ds.as_numpy_iterator():
    n = len(batch["_mask"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    template = template or {k: np.zeros_like(v) for k, v in batch.items()}
    emitted += 1
    yield batch
  if num_batches is not None:
    if template is None:
      raise DataError(f"no usable evaluation samples on process {process_index} "
                      f"({stats.summary()})")
    for _ in range(num_batches - emitted):
      yield template


def device_batches(batches: Iterable[dict], sharding, *, prefetch: int = 2
                   ) -> Iterator[tuple[Any, dict]]:
  """``(device_batch, host_batch)`` pairs, ``prefetch`` batches ahead.

  Keys starting with ``_`` except ``_mask`` stay on the host (positions, keys);
  everything else becomes a global array sharded by ``sharding``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  queue = collections.deque()

  def put(batch):
    host = {k: v for k, v in batch.items() if k.startswith("_") and k != "_mask"}
    device = {k: jax.make_array_from_process_local_data(sharding, v)
              for k, v in batch.items() if k not in host}
    return device, host

  for batch in batches:
    queue.append(put(batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
