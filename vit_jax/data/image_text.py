"""Image-text pairs from webdataset-style ``.tar`` shards (img2dataset/DataComp format).

A shard is a plain tar file in which consecutive members sharing a key form a sample::

  000123.jpg    the image (jpg, jpeg, png, webp or bmp)
  000123.txt    the caption, UTF-8
  000123.json   optional metadata (uid, label, ...)

Shards may be local or remote (``gs://...``): they are listed and opened through
``etils.epath``. Bad data never stops a run: a sample without caption or image, a
caption that is not UTF-8, unreadable metadata or a member larger than
``MAX_MEMBER_BYTES`` (left unread) is skipped when its shard is read, an
image that does not decode is skipped by the decoding threads, and both are counted
(``SkipStats``); the trainer reports the counts in its logs. A truncated shard yields
the samples before the damage, a 0-byte shard none; they are counted too.

Training stream, per process (``ImageTextStream``)::

  shards of process p   = shards[p::process_count]
  epoch e               = those shards in an order drawn from (seed, p, e), cut into
                          windows of ``shards_per_window`` consecutive shards
  window w              = its shards read in parts of at most ``window_bytes`` of
                          samples (None: whole shards), an equal share of the bytes
                          from each shard not yet done (at least one sample)
  part                  = its samples, shuffled with (seed, p, e, w, first sample)
  position              = (e, w, k, part, window_bytes, starts): the next sample is
                          number k of window w; its part begins at the window's sample
                          ``part``, at byte ``starts[i]`` of the window's shard i

Each sample comes with the position after it. The trainer checkpoints the position
of the last sample it consumed, and a resumed stream starts exactly there: nothing is
repeated or skipped, and resuming costs reading one part (it seeks to the recorded
tar header offsets; a compressed shard is decompressed up to them), not the epoch.
Shuffling a whole part (rather than a sliding buffer) is what makes the position a
small exact list. Memory: two parts (the one consumed and the next, read ahead), at
most ``2 * window_bytes`` of encoded samples whatever the shards' size, plus the
sample each reading thread has just read (a single sample bigger than its shard's
share makes a block of that one sample). A window of
shards smaller than the share is one part, shuffled as before parts existed.

Input pipeline (``TrainData``): the stream only reads. It parses the tar members in
Python threads (the standard library's ``tarfile``, as webdataset's tar iterator
does; one thread per shard of a part, the next part read while the current one is
consumed) and hands encoded images and captions to tf.data in chunks. Decoding,
cropping and augmentation run as TensorFlow ops in tf.data's parallel map, and
tokenization runs on whole batches in the Rust tokenizer (which releases the
interpreter lock), so one process uses as many cores as tf.data is given. Every op is keyed by the sample's position and the maps
keep their order, so the batches are a function of the seed and the start position.
"""

import collections
import concurrent.futures
import dataclasses
import glob
import io
import itertools
import json
import os
import re
import tarfile
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from absl import logging
from etils import epath

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
# Warnings naming individual skipped samples stop after this many per reason (the
# counts go on).
MAX_SKIP_WARNINGS = 20
# A sample with a bigger member (file) is skipped unread: one huge or hostile member
# must not take the reader's memory. DataComp's images are well under 1 MiB.
MAX_MEMBER_BYTES = 64 << 20
# Reasons that count damaged shards, not samples.
SHARD_REASONS = ("truncated_shard", "empty_shard")
# The most bytes of samples one window part holds (``ImageTextStream``'s
# ``window_bytes``): two parts are in memory, whatever the shards' size.
WINDOW_BYTES = 1 << 30
# Samples per hand-over from the reading thread to tf.data.
CHUNK = 128
# Keys remembered per pipeline to name the samples whose image fails to decode; the
# decoding threads run at most a few batches behind the reader.
RECENT_KEYS = 1 << 17
# The reader stops with an error when this many samples (or 64 batches) in a row gave
# no image: otherwise a pool of undecodable images would wait forever.
MAX_UNDECODED_RUN = 1 << 17


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


def _glob(pattern: str) -> list[str]:
  """Files matching ``pattern``, local or remote, sorted."""
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  found = epath.Path(base).glob("/".join(parts[first:]))
  prefix = "" if parts[:first] else "./"  # epath keeps "./" off relative results
  return sorted(str(p).removeprefix(prefix) for p in found)


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
      path = epath.Path(name)
      if glob.has_magic(name):
        found = _glob(name)
      elif "://" in name and name.endswith(".tar"):
        # Checked when read: a request per shard here would take minutes for a
        # DataComp-sized brace range.
        found = [name]
      elif path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
      else:
        if not path.exists():
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
  """Counts of skipped samples (and damaged shards) by reason; thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()

  def record(self, reason: str, key: str, shard: str, detail: str = "") -> None:
    with self._lock:
      self.counts[reason] += 1
      warn = self.counts[reason] <= MAX_SKIP_WARNINGS
    if warn:
      logging.warning("skipped sample %r of %s: %s%s", key, shard, reason.replace("_", " "),
                      f" ({detail})" if detail else "")

  @property
  def total(self) -> int:
    """Skipped samples (damaged shards are counted apart)."""
    with self._lock:
      return sum(v for k, v in self.counts.items() if k not in SHARD_REASONS)

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
  """The samples of one shard, in order, undecoded.

  A sample with a member larger than ``MAX_MEMBER_BYTES`` is skipped (counted as
  ``member_too_large``) without reading that member into memory.
  """
  for raw, _ in _read_tar(path, 0, stats):
    yield raw


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _read_tar(path: str, start: int, stats: Optional[SkipStats]
              ) -> Iterator[tuple[RawSample, int]]:
  """``read_shard`` from byte ``start`` (the header of a sample's first member), with
  the byte offset where each sample's first header begins.

  A plain tar is entered by seeking to ``start``; a compressed one (offsets then
  count uncompressed bytes) is decompressed from its beginning up to ``start``.
  """
  key, files, too_large, begin, skip_to = None, {}, None, start, 0

  def finished():
    if too_large is None:
      return RawSample(key, path, files)
    if stats is not None:
      stats.record("member_too_large", key, path, too_large)
    return None

  try:
    with epath.Path(path).open("rb") as f:
      if start and f.read(6).startswith(_COMPRESSED_MAGIC):
        f.seek(0)
        base, skip_to, mode = 0, start, "r|*"
      else:
        f.seek(start)
        base, mode = start, "r|*" if start == 0 else "r|"
      with tarfile.open(fileobj=f, mode=mode) as tar:
        for member in tar:
          offset = base + member.offset
          if offset < skip_to or not member.isfile():
            continue
          name_key, ext = _split_name(member.name)
          if name_key != key and key is not None:
            if (raw := finished()) is not None:
              yield raw, begin
            files, too_large = {}, None
          if name_key != key:
            begin = offset
          key = name_key
          if member.size > MAX_MEMBER_BYTES:  # the stream reads past it in small blocks
            too_large = (f"{member.name} has {member.size} bytes, more than "
                         f"MAX_MEMBER_BYTES={MAX_MEMBER_BYTES}")
            continue
          files[ext] = tar.extractfile(member).read()
  except FileNotFoundError as e:
    raise DataError(f"shard {path} does not exist") from e
  except (tarfile.TarError, OSError, EOFError) as e:
    if stats is not None:
      empty = key is None and start == 0 and str(e) == "empty file"
      stats.record("empty_shard" if empty else "truncated_shard", key or "-", path, str(e))
    # Everything before the damage is usable; a partial last sample is dropped.
    return
  if key is not None and (raw := finished()) is not None:
    yield raw, begin


def _read_block(path: str, start: int, budget: Optional[int], stats: Optional[SkipStats],
                hold: Callable[[int], None] = lambda nbytes: None
                ) -> tuple[list[RawSample], int, int]:
  """The samples of ``path`` from byte ``start`` that fit in ``budget`` bytes (at least
  one; None: all), the offset where the next one begins (-1: the shard is done), and
  their bytes. ``hold(n)`` is told of every sample's bytes as it is read (and of the
  one read past the budget, dropped again)."""
  raws, held = [], 0
  samples = _read_tar(path, start, stats)
  try:
    for raw, begin in samples:
      size = sum(len(v) for v in raw.files.values())
      hold(size)
      if raws and budget is not None and held + size > budget:
        hold(-size)
        return raws, begin, held  # this sample starts the shard's next block
      raws.append(raw)
      held += size
  finally:
    samples.close()
  return raws, -1, held


def check_sample(raw: RawSample, stats: Optional[SkipStats] = None) -> Optional[dict]:
  """``{"key", "shard", "image_bytes", "caption", "meta"}``, or None if unusable.

  Everything is checked but the image, which the input pipelines decode.
  """
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
  return {"key": raw.key, "shard": raw.shard, "caption": caption, "meta": meta,
          "image_bytes": raw.files[image_ext]}


def decode_sample(raw: RawSample, stats: Optional[SkipStats] = None,
                  *, decode_image: bool = True) -> Optional[dict]:
  """``check_sample`` plus ``"image"`` (uint8 HWC RGB, decoded with PIL), or None.

  For inspection and tools; the input pipelines decode in TensorFlow.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  sample = check_sample(raw, stats)
  if sample is None or not decode_image:
    return sample
  try:
    with Image.open(io.BytesIO(sample["image_bytes"])) as image:
      sample["image"] = np.asarray(image.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    if stats is not None:
      stats.record("corrupt_image", raw.key, raw.shard, f"{type(e).__name__}: {e}")
    return None
  return sample


def iterate_samples(shards: Sequence[str], *, stats: Optional[SkipStats] = None,
                    decode_image: bool = True, threads: int = 4) -> Iterator[dict]:
  """Every usable sample of ``shards`` once, in order (inspection, filtering).

  Reads ``CHUNK`` samples at a time, not whole shards.
  """
  decode = lambda r: decode_sample(r, stats, decode_image=decode_image)
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    for shard in shards:
      raws = read_shard(shard, stats)
      while chunk := list(itertools.islice(raws, CHUNK)):
        for sample in pool.map(decode, chunk):
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
    self._file = None
    self._tar: Optional[tarfile.TarFile] = None
    epath.Path(pattern).parent.mkdir(parents=True, exist_ok=True)

  def write(self, key: str, files: dict) -> None:
    """``files``: extension -> bytes (or str, encoded as UTF-8)."""
    if self.count % self.samples_per_shard == 0:
      self._close_shard()
      path = self.pattern.format(len(self.paths))
      self.paths.append(path)
      self._file = epath.Path(path).open("wb")
      self._tar = tarfile.open(fileobj=self._file, mode="w")
    for ext, data in files.items():
      data = data.encode("utf-8") if isinstance(data, str) else data
      info = tarfile.TarInfo(f"{key}.{ext}")
      info.size, info.mtime, info.mode = len(data), 0, 0o644
      self._tar.addfile(info, io.BytesIO(data))
    self.count += 1

  def _close_shard(self) -> None:
    if self._tar is not None:
      self._tar.close()
      self._file.close()
      self._tar = self._file = None

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
  """Where a process's stream continues: sample ``offset`` of ``window`` of ``epoch``.

  A window is read in parts of at most ``window_bytes`` (None: whole shards): the
  current part begins with the window's sample number ``part`` and is read from byte
  ``starts[i]`` of the window's shard ``i`` (-1: that shard is done). ``starts == ()``
  is the window's beginning, or, with ``offset > 0``, a position of a run from before
  window parts (``[epoch, window, offset]``), whose window is finished whole.
  """
  epoch: int = 0
  window: int = 0
  offset: int = 0
  part: int = 0
  window_bytes: Optional[int] = None
  starts: tuple[int, ...] = ()

  def to_list(self) -> list[int]:
    return [self.epoch, self.window, self.offset, self.part, self.window_bytes or 0,
            *self.starts]

  @classmethod
  def from_list(cls, values: Sequence[int]) -> "StreamPosition":
    """From ``to_list``'s list (or the ``[epoch, window, offset]`` of older runs)."""
    values = [int(v) for v in values]
    if len(values) == 3:
      return cls(*values)
    return cls(*values[:4], window_bytes=values[4] or None, starts=tuple(values[5:]))


def process_shards(shards: Sequence[str], process_index: int, process_count: int
                   ) -> list[str]:
  """The shards one process reads: every ``process_count``-th, from ``process_index``."""
  if len(shards) < process_count:
    raise DataError(f"{len(shards)} shards cannot feed {process_count} processes: every "
                    "process needs at least one shard. Re-shard the data into more "
                    "files (python -m vit_jax.tools.filter_pool --samples_per_shard=...).")
  return list(shards[process_index::process_count])


class ImageTextStream:
  """An endless, shuffled, exactly resumable stream of undecoded samples for one process.

  Iterating yields ``(sample, position)``: the sample (``check_sample``'s dict) and the
  position of the stream after it. ``ImageTextStream(..., position=p)`` continues right
  after the sample that returned ``p``. A window is read in parts of at most
  ``window_bytes`` of samples (None: whole shards), each taking its share from every
  shard of the window; up to two parts are in memory: the one being consumed and the
  next, read in the background. ``max_held_bytes`` records the most held at once (as
  samples are read): at most ``2 * window_bytes`` plus one sample per reading thread.
  """

  def __init__(self, shards: Sequence[str], *, seed: int, process_index: int = 0,
               process_count: int = 1, shards_per_window: int = 4,
               window_bytes: Optional[int] = WINDOW_BYTES,
               position: Optional[StreamPosition] = None,
               stats: Optional[SkipStats] = None):
    if not shards:
      raise DataError("the shard list is empty")
    if shards_per_window < 1:
      raise ValueError(f"shards_per_window={shards_per_window} must be at least 1")
    if window_bytes is not None and window_bytes < 1:
      raise ValueError(f"window_bytes={window_bytes} must be at least 1 (None: whole "
                       "shards)")
    self.shards = process_shards(list(shards), process_index, process_count)
    self.seed = seed
    self.process_index = process_index
    self.shards_per_window = shards_per_window
    self.window_bytes = window_bytes
    self.position = position or StreamPosition()
    self.stats = stats if stats is not None else SkipStats()
    self.num_windows = -(-len(self.shards) // shards_per_window)
    self._held_lock = threading.Lock()
    self.held_bytes = self.max_held_bytes = 0
    starts = self.position.starts
    if starts and len(starts) != shards_per_window:
      raise DataError(f"the stream position {self.position.to_list()} was written with "
                      f"input.shards_per_window={len(starts)}; resume with that value "
                      f"(now {shards_per_window})")

  def windows(self, epoch: int) -> list[list[str]]:
    rng = np.random.default_rng([self.seed, self.process_index, epoch])
    order = [self.shards[i] for i in rng.permutation(len(self.shards))]
    n = self.shards_per_window
    return [order[i:i + n] for i in range(0, len(order), n)]

  def _first_starts(self, epoch: int, window: int) -> tuple[int, ...]:
    """A window's beginning: byte 0 of its shards, -1 for the slots it lacks."""
    n = len(self.windows(epoch)[window])
    return (0,) * n + (-1,) * (self.shards_per_window - n)

  def _hold(self, nbytes: int) -> None:
    with self._held_lock:
      self.held_bytes += nbytes
      self.max_held_bytes = max(self.max_held_bytes, self.held_bytes)

  def _read_part(self, pool, epoch: int, window: int, part: int,
                 window_bytes: Optional[int], starts: Sequence[int]
                 ) -> Callable[[], tuple[list[RawSample], tuple[int, ...], int]]:
    """Starts reading a part of a window (its shards in parallel, each from its start,
    an equal share of ``window_bytes`` each); returns a function that waits for its
    undecoded samples in the stream's shuffled order, the next part's starts and the
    bytes it holds."""
    shards = self.windows(epoch)[window]
    live = max(sum(start >= 0 for start in starts), 1)
    budget = None if window_bytes is None else max(window_bytes // live, 1)

    parts = [pool.submit(_read_block, shard, start, budget, self.stats, self._hold)
             if start >= 0 else None
             for shard, start in zip(shards, starts)]

    def samples():
      blocks = [([], -1, 0) if p is None else p.result() for p in parts]
      raws = [raw for block in blocks for raw in block[0]]
      ends = tuple(block[1] for block in blocks) + (-1,) * (len(starts) - len(blocks))
      # The first part shuffles as whole windows did before windows had parts.
      key = [self.seed, self.process_index, epoch, window, 1] + ([part] if part else [])
      rng = np.random.default_rng(key)
      return [raws[i] for i in rng.permutation(len(raws))], ends, sum(b[2] for b in blocks)

    return samples

  def __iter__(self) -> Iterator[tuple[dict, StreamPosition]]:
    epoch, window, offset, part, window_bytes, starts = dataclasses.astuple(self.position)
    if window >= self.num_windows:
      raise DataError(f"the stream position {self.position.to_list()} names window "
                      f"{window}, but {len(self.shards)} shards in windows of "
                      f"input.shards_per_window={self.shards_per_window} make "
                      f"{self.num_windows}; resume with the shards and settings of the run")
    # A window in progress is finished with the parts it was cut into, so a resume
    # that changes input.window_bytes stays exact (the new size starts with the next
    # window); an older run's position finishes its window whole.
    if not starts and offset == 0:
      window_bytes = self.window_bytes
    starts = starts or self._first_starts(epoch, window)

    def following(e, w, part, size, n, ends):
      """The part after one of ``n`` samples that ended at ``ends``."""
      if any(end >= 0 for end in ends):
        return e, w, part + n, size, ends
      e, w = (e, w + 1) if w + 1 < self.num_windows else (e + 1, 0)
      return e, w, 0, self.window_bytes, self._first_starts(e, w)

    pool = concurrent.futures.ThreadPoolExecutor(self.shards_per_window)
    try:
      pending = self._read_part(pool, epoch, window, part, window_bytes, starts)
      yielded, whole_epoch = 0, window == 0 and offset == 0
      while True:
        raws, ends, held = pending()
        if offset - part > len(raws):
          raise DataError(
              f"the stream position {[epoch, window, offset]} is past the {len(raws)} "
              "samples of its window part: the shards changed since it was written; "
              "resume with those of the run")
        after = following(epoch, window, part, window_bytes, len(raws), ends)
        pending = self._read_part(pool, *after)
        for i in range(offset - part, len(raws)):
          sample = check_sample(raws[i], self.stats)
          if sample is not None:
            yielded += 1
            yield sample, StreamPosition(epoch, window, part + i + 1, part, window_bytes,
                                         starts)
        del raws
        self._hold(-held)
        new_epoch = after[0] != epoch
        epoch, window, part, window_bytes, starts = after
        offset = part
        if new_epoch:
          if yielded == 0 and whole_epoch:
            raise DataError(f"no usable samples in {len(self.shards)} shards "
                            f"({self.stats.summary()}); first shard: {self.shards[0]}")
          yielded, whole_epoch = 0, True
    finally:
      pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- tf.data pipelines

def _example_seed(seed: int, process_index: int, position):
  """A per-sample preprocessing seed that depends only on where the sample is."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = tf.constant([seed, process_index], tf.int64)
  for i in range(3):
    rng = tf.random.experimental.stateless_fold_in(rng, position[i])
  return rng


class _Chunks:
  """Hands samples to tf.data in chunks, numbered, remembering their recent keys.

  The decoding threads drop images that do not decode (``ignore_errors``); the gaps
  in the numbers of the samples that come out count them, and ``recent`` names them.
  ``ignore_errors`` would also swallow the reader's errors and end the dataset
  quietly, so the reader keeps its error in ``error`` for the consumer to raise.
  """

  def __init__(self, columns: dict[str, Any], batch_size: int):
    self.columns = columns  # name -> tf.TensorSpec of one sample
    self.max_run = max(MAX_UNDECODED_RUN, 64 * batch_size)
    self.recent: dict[int, tuple[str, str]] = {}
    self.delivered = -1  # the number of the last sample that came out
    self.error: Optional[Exception] = None

  def signature(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    spec = {k: tf.TensorSpec([None, *v.shape], v.dtype) for k, v in self.columns.items()}
    return {**spec, "_seq": tf.TensorSpec([None], tf.int64)}

  def generate(self, examples: Iterable[tuple[dict, str]]) -> Iterator[dict]:
    """``examples``: (columns, shard) pairs; yields chunks of stacked columns."""
    rows, seq, self.delivered, self.error = [], 0, -1, None
    try:
      for example, shard in examples:
        if seq - self.delivered > self.max_run:
          raise DataError(f"none of the last {seq - self.delivered - 1} images decoded "
                          f"(the last one read: {example['_key']} of {shard})")
        self.recent[seq] = (example["_key"], shard)
        self.recent.pop(seq - RECENT_KEYS, None)
        rows.append(example)
        seq += 1
        if len(rows) == CHUNK:
          yield self._stack(rows, seq)
          rows = []
    except Exception as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      self.error = e
      return
    if rows:
      yield self._stack(rows, seq)

  def _stack(self, rows: list[dict], end: int) -> dict:
    chunk = {k: np.asarray([r[k] for r in rows], dtype=object if v.dtype.name == "string"
                           else v.dtype.as_numpy_dtype)
             for k, v in self.columns.items()}
    chunk["_seq"] = np.arange(end - len(rows), end, dtype=np.int64)
    return chunk

  def count_dropped(self, seqs: np.ndarray, stats: SkipStats) -> None:
    """Records the samples before the last of ``seqs`` that did not come out."""
    delivered = set(seqs.tolist())
    for seq in range(self.delivered + 1, int(seqs[-1]) + 1):
      if seq not in delivered:
        key, shard = self.recent.get(seq, ("?", "?"))
        stats.record("corrupt_image", key, shard, "the image does not decode")
    self.delivered = int(seqs[-1])


def _decode_and_preprocess(ds, preprocess_fn: Callable, rng_fn: Optional[Callable] = None):
  """Parallel maps: decode ``image`` (dropping what does not decode), then preprocess.

  ``rng_fn(example) -> [2] int64`` gives the random ops their per-sample seed.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def decode(ex):  # RGB, as the pp's decode op would make it
    image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    return {**ex, "image": image}

  def preprocess(ex):
    inputs = {"image": ex["image"]}
    if rng_fn is not None:
      inputs["_rng"] = rng_fn(ex)
    # The pp's outputs replace the image: ``image``, or the naflex op's patches,
    # positions, segment ids and grid size (see ``model_images``).
    out = {k: v for k, v in preprocess_fn(inputs).items() if not k.startswith("_")}
    return {**{k: v for k, v in ex.items() if k != "image"}, **out}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Only the decode map may drop: an error in preprocessing is a configuration error.
  ds = ds.ignore_errors()
  return ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _tokenize(ds, tokenizer):
  """Batches' ``caption`` -> ``text`` (int32 ``[batch, context_length]``)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def tokenize(batch):
    batch = dict(batch)
    batch["text"] = tokenizer.encode_tf(batch.pop("caption"))
    return batch

  return ds.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class TrainData:
  """tf.data batches of one process's stream, and an iterator over them.

  ``dataset`` holds ``{"image", "text", "_position", "_key", "_seq"}`` batches (with
  the ``naflex`` pp op: its patch inputs instead of ``image``, see ``model_images``);
  ``_position`` of each row is the stream position after it, so the last row of a
  batch is where the stream continues after that batch. Iterating gives numpy
  batches (without ``_seq``) and records the images that did not decode in
  ``stream.stats``.

  Args:
    threads: tf.data's threads (decoding, preprocessing, tokenizing); None: as many
      as the machine has cores.
  """

  def __init__(self, stream: ImageTextStream, *, tokenizer, preprocess_fn: Callable,
               batch_size: int, threads: Optional[int] = None):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    self.stream = stream
    self._chunks = _Chunks({"image": tf.TensorSpec([], tf.string),
                            "caption": tf.TensorSpec([], tf.string),
                            "_key": tf.TensorSpec([], tf.string),
                            "_position": tf.TensorSpec([5 + stream.shards_per_window],
                                                          tf.int64)}, batch_size)

    def examples():
      for sample, position in stream:
        yield {"image": sample["image_bytes"], "caption": sample["caption"],
               "_key": sample["key"], "_position": position.to_list()}, sample["shard"]

    ds = tf.data.Dataset.from_generator(lambda: self._chunks.generate(examples()),
                                        output_signature=self._chunks.signature())
    ds = _decode_and_preprocess(
        ds.unbatch(), preprocess_fn,
        lambda ex: _example_seed(stream.seed, stream.process_index, ex["_position"]))
    ds = _tokenize(ds.batch(batch_size, drop_remainder=True), tokenizer)
    self.dataset = ds.prefetch(tf.data.AUTOTUNE).with_options(
        input_pipeline.dataset_options(threads))

  def __iter__(self) -> Iterator[dict]:
    for batch in self.dataset.as_numpy_iterator():
      self._chunks.count_dropped(batch.pop("_seq"), self.stream.stats)
      yield batch
    raise self._chunks.error or DataError("the training stream ended")


def make_eval_batches(shards: Sequence[str], *, preprocess_fn: Callable, batch_size: int,
                      tokenizer=None, label_key: Optional[str] = None,
                      process_index: int = 0, process_count: int = 1,
                      num_batches: Optional[int] = None,
                      stats: Optional[SkipStats] = None,
                      threads: Optional[int] = None) -> Iterator[dict]:
  """This process's samples once, in order, as padded numpy batches with ``_mask``.

  Batches hold ``image``, ``_key``, ``_mask`` and, with a tokenizer, ``text``; with
  ``label_key``, ``label`` from each sample's JSON metadata (samples without it are
  skipped and counted). ``num_batches`` pads with masked batches up to that count, so
  that every process runs the same number of steps.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  stats = stats if stats is not None else SkipStats()
  local = list(shards[process_index::process_count])
  columns = {"image": tf.TensorSpec([], tf.string), "_key": tf.TensorSpec([], tf.string)}
  if tokenizer is not None:
    columns["caption"] = tf.TensorSpec([], tf.string)
  if label_key is not None:
    columns["label"] = tf.TensorSpec([], tf.int32)
  chunks = _Chunks(columns, batch_size)

  def examples():
    for shard in local:
      for raw in read_shard(shard, stats):
        sample = check_sample(raw, stats)
        if sample is None:
          continue
        example = {"image": sample["image_bytes"], "_key": sample["key"],
                   "caption": sample["caption"]}
        if label_key is not None:
          if label_key not in sample["meta"]:
            stats.record("missing_label", sample["key"], shard, f"no {label_key!r} in json")
            continue
          example["label"] = int(sample["meta"][label_key])
        yield example, shard

  ds = tf.data.Dataset.from_generator(lambda: chunks.generate(examples()),
                                      output_signature=chunks.signature())
  ds = _decode_and_preprocess(ds.unbatch(), preprocess_fn)
  ds = ds.map(lambda ex: {**ex, "_mask": tf.constant(True)}).batch(batch_size)
  if tokenizer is not None:
    ds = _tokenize(ds, tokenizer)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(input_pipeline.dataset_options(threads))

  emitted, template = 0, None
  for batch in ds.as_numpy_iterator():
    chunks.count_dropped(batch.pop("_seq"), stats)
    n = len(batch["_mask"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    template = template or {k: np.zeros_like(v) for k, v in batch.items()}
    emitted += 1
    yield batch
  if chunks.error is not None:
    raise chunks.error
  if num_batches is not None:
    if template is None:
      raise DataError(f"no usable evaluation samples on process {process_index} "
                      f"({stats.summary()})")
    for _ in range(num_batches - emitted):
      yield template


def model_images(batch: dict) -> Any:
  """What a batch feeds the image tower: ``image`` (NHWC), or, after the ``naflex`` pp
  op, the dict of packed inputs that ``vit_jax.models.naflex`` reads."""
  if "image" in batch:
    return batch["image"]
  from vit_jax.models.naflex import INPUT_KEYS  # pylint: disable=g-import-not-at-top
  missing = [k for k in INPUT_KEYS if k not in batch]
  if missing:
    raise DataError(f"the batch has no 'image' and no NaFlex inputs {missing}: the pp "
                    "must end with an image op or with naflex(patch_size, max_patches); "
                    f"batch keys: {sorted(batch)}")
  return {k: batch[k] for k in INPUT_KEYS}


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
