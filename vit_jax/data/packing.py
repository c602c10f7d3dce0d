"""NaFlex/NaViT inputs: patchify images of any size and pack them into fixed shapes.

``patchify`` cuts one image into flat patches with their grid positions;
``pack`` puts up to ``images_per_pack`` of them into one sequence of ``seq_len``
tokens (segment ids ``1..K``, 0 for padding); ``pack_stream`` packs an iterator
greedily, in order, into batches of packs. Shapes never depend on the images, so one
compiled step serves every batch (``vit_jax.models.naflex`` reads these dicts). The
TensorFlow op ``naflex`` (``vit_jax.data.preprocess``) does the aspect-preserving
resize and the patchifying inside tf.data; this module is plain numpy (the packing is
a greedy, sequential choice that tf.data's maps do not express).
"""

from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]


def patchify(image: np.ndarray, patch_size: int) -> dict:
  """``[H, W, C]`` -> ``patches [n, p*p*C]`` (row, column, channel order),
  ``positions [n, 2]`` and ``grid_size [2]``; sides must divide by ``patch_size``."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"patchify takes one [height, width, channels] image, got "
                     f"{image.shape}")
  h, w, c = image.shape
  p = patch_size
  gh, gw = h // p, w // p
  if gh * gw == 0:
    raise ValueError(f"image of {h}x{w} pixels has zero {p}x{p} patches; resize it "
                     f"to at least {p}x{p} (the naflex op does)")
  if h % p or w % p:
    raise ValueError(f"image of {h}x{w} pixels does not divide into {p}x{p} patches; "
                     "nothing is cropped silently: resize it first (the naflex op does)")
  patches = image.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(
      gh * gw, p * p * c)
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  return {"patches": patches, "positions": np.stack([rows, cols], -1).reshape(-1, 2),
          "grid_size": np.array([gh, gw], np.int32)}


def _valid_length(example: Example) -> int:
  """Patches an example holds: all of them, or where its own ``segment_ids`` (from
  the naflex op, padded) are nonzero."""
  if "segment_ids" in example:
    return int(np.count_nonzero(np.asarray(example["segment_ids"])))
  return int(np.asarray(example["patches"]).shape[0])


def pack(examples: Sequence[Example], seq_len: int, images_per_pack: int,
         extra_keys: Sequence[str] = ()) -> dict:
  """One pack: the examples' patches end to end, then padding.

  Each example has ``patches``, ``positions``, ``grid_size`` (``patchify``'s, or the
  naflex op's ``grid_sizes`` with its padding marked by ``segment_ids``). ``extra_keys`` (e.g.
  ``label``) are stacked per image slot, ``-1`` in empty slots.
  """
  if not 1 <= len(examples) <= images_per_pack:
    raise ValueError(f"a pack holds 1 to images_per_pack={images_per_pack} images, got "
                     f"{len(examples)}")
  lengths = [_valid_length(e) for e in examples]
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"image {i} of the pack has zero patches")
  if sum(lengths) > seq_len:
    raise ValueError(f"{len(examples)} images of {lengths} patches need "
                     f"{sum(lengths)} tokens, more than the pack's seq_len={seq_len}; "
                     "nothing is cropped: use fewer images per pack, a longer "
                     "sequence or fewer patches per image")
  dim = np.asarray(examples[0]["patches"]).shape[-1]
  out = {"patches": np.zeros((seq_len, dim), np.float32),
         "segment_ids": np.zeros((seq_len,), np.int32),
         "positions": np.zeros((seq_len, 2), np.int32),
         "grid_sizes": np.zeros((images_per_pack, 2), np.int32)}
  start = 0
  for k, (example, n) in enumerate(zip(examples, lengths)):
    out["patches"][start:start + n] = np.asarray(example["patches"])[:n]
    out["positions"][start:start + n] = np.asarray(example["positions"])[:n]
    out["segment_ids"][start:start + n] = k + 1
    out["grid_sizes"][k] = np.asarray(example["grid_size"] if "grid_size" in example
                                      else example["grid_sizes"]).reshape(2)
    start += n
  for key in extra_keys:
    values = [np.asarray(e[key]) for e in examples]
    column = np.full((images_per_pack,) + values[0].shape, -1, values[0].dtype)
    column[:len(values)] = values
    out[key] = column
  return out


def pack_stream(examples: Iterable[Example], seq_len: int, images_per_pack: int,
                batch_size: int, extra_keys: Sequence[str] = ()) -> Iterator[dict]:
  """Batches of ``batch_size`` packs, filled greedily in stream order: an image goes
  into the current pack while it fits (tokens and image slots), else starts the next
  pack. A last, partial batch is dropped."""
  batch, current, used = [], [], 0
  for example in examples:
    n = _valid_length(example)
    if n > seq_len or n == 0:
      pack([example], seq_len, images_per_pack)  # raises the error naming the problem
    if current and (used + n > seq_len or len(current) == images_per_pack):
      batch.append(pack(current, seq_len, images_per_pack, extra_keys))
      current, used = [], 0
      if len(batch) == batch_size:
        yield {k: np.stack([b[k] for b in batch]) for k in batch[0]}
        batch = []
    current.append(example)
    used += n


def from_config(packing: Optional[Mapping], *, patch_inputs: bool, naflex_model: bool,
                streams: int) -> Optional[Mapping]:
  """The classification trainer's ``input.packing`` checked (None when ``seq_len`` is
  0 or unset): ``patch_inputs``, the pp ends with the naflex op; ``naflex_model``,
  ``model.naflex``; ``streams``, the processes or data shards reading the split."""
  if not packing or not packing.get("seq_len"):
    return None
  if not (patch_inputs and naflex_model):
    raise ValueError("input.packing packs the naflex pp op's patches for a NaFlex model: "
                     "end input.pp_train with naflex(patch_size, max_patches) and set "
                     "model.naflex=True")
  if not packing.get("images_per_pack"):
    raise ValueError(f"config.input.packing.images_per_pack="
                     f"{packing.get('images_per_pack')!r}: must be >= 1 with packing")
  if streams > 1:
    raise ValueError("input.packing reads one stream on one process (each pack takes "
                     "a varying number of images); multi-process packing is not built")
  return packing


def packed_batches(batches_of_one: Iterable[Mapping], seq_len: int,
                   images_per_pack: int, packs_per_batch: int) -> Iterator[dict]:
  """The classification pipeline's stream as batches of packs (``input.packing``).

  ``batches_of_one``: numpy batches of one example, ``{"image": the naflex op's dict,
  "label": [1]}``, in stream order. Yields ``{"image": {patches [P, L, D],
  segment_ids [P, L], positions [P, L, 2], grid_sizes [P, K, 2]}, "label": [P, K]
  (-1: an empty slot), "_examples": images in the batch}``. Packing is greedy and in
  order, and an image that does not fit a full batch starts the next one, so the
  stream position after a batch is the sum of ``_examples`` so far: a run resumed
  there packs the same batches (the trainer checkpoints that sum).
  """
  def examples():
    for batch in batches_of_one:
      image, label = batch["image"], np.asarray(batch["label"])
      if not isinstance(image, Mapping):
        raise ValueError("packing takes the naflex pp op's patches: end the pp with "
                         "naflex(patch_size, max_patches); the image is an array of "
                         f"shape {np.shape(image)}")
      if label.shape[:1] != (1,):
        raise ValueError(f"packed_batches takes batches of one example, got labels of "
                         f"shape {label.shape}")
      yield {**{k: np.asarray(v)[0] for k, v in image.items()}, "label": label[0]}

  for batch in pack_stream(examples(), seq_len, images_per_pack, packs_per_batch,
                           extra_keys=("label",)):
    label = batch.pop("label")
    yield {"image": batch, "label": label, "_examples": int(np.sum(label >= 0))}


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
  """The fraction of a batch's tokens that are image patches, not padding."""
  return float(np.mean(np.asarray(batch["segment_ids"]) > 0))


def unpacked(example: Example, seq_len: Optional[int] = None) -> dict:
  """One image as a pack of one (NaFlex without packing), batched: ``[1, ...]``."""
  n = _valid_length(example)
  out = pack([example], seq_len or n, 1)
  return {k: v[None] for k, v in out.items()}
