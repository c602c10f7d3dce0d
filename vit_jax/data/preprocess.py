"""Preprocessing written as a pipe of ops, the way big_vision users know it.

  pp = preprocess.parse("decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)")
  example = pp({"image": encoded_jpeg, "label": 3, "_rng": seed})

Each op is a registered constructor ``name(*args, **kwargs) -> fn(example) -> example``
over TensorFlow tensors (it runs inside tf.data). Random ops draw from stateless
generators keyed by the example's ``_rng`` (``[2]`` int64, set by the input pipeline
from the run seed and the example's position in the stream), so the same seed gives
the same images, with any parallelism and after a resume.
"""

import ast
import difflib
from typing import Callable, Optional

import tensorflow as tf

Example = dict
Op = Callable[[Example], Example]
_OPS: dict[str, Callable[..., Op]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(name: str):
  def decorator(constructor):
    _OPS[name] = constructor
    return constructor
  return decorator


def available_ops() -> list[str]:
  return sorted(_OPS)


def _parse_op(text: str) -> Op:
  try:
    node = ast.parse(text.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"cannot parse preprocessing op {text!r}: {e.msg}") from None
  if isinstance(node, ast.Name):
    name, args, kwargs = node.id, [], {}
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name = node.func.id
    try:
      args = [ast.literal_eval(a) for a in node.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ValueError(f"preprocessing op {text!r}: arguments must be literals") from None
  else:
    raise ValueError(f"cannot parse preprocessing op {text!r}; expected name(args)")
  if name not in _OPS:
    close = difflib.get_close_matches(name, _OPS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown preprocessing op {name!r}.{hint} "
                     f"Available: {', '.join(available_ops())}.")
  try:
    return _OPS[name](*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"preprocessing op {text!r}: {e}") from None


def parse(spec: str) -> Op:
  """Turns ``"op1|op2(args)|..."`` into one function over an example dict."""
  ops = [_parse_op(part) for part in spec.split("|") if part.strip()]

  def apply(example: Example) -> Example:
    example = dict(example)
    for i, op in enumerate(ops):
      if "_rng" in example:  # each op gets its own stream
        example["_op_rng"] = tf.random.experimental.stateless_fold_in(example["_rng"], i)
      example = op(example)
    example.pop("_op_rng", None)
    example.pop("_rng", None)
    return example

  return apply


def _seed(example: Example) -> tf.Tensor:
  if "_op_rng" not in example:
    raise ValueError("a random preprocessing op needs the input pipeline's per-example "
                     "seed (_rng); it is set by vit_jax.data.input_pipeline")
  return example["_op_rng"]


def _size(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def _image_op(fn):
  """Wraps ``fn(image, example) -> image`` into an op on the ``image`` key."""
  def op(example):
    example = dict(example)
    example["image"] = fn(example["image"], example)
    return example
  return op


@register("decode")
def decode(channels: int = 3):
  """Decodes JPEG/PNG bytes to uint8 HWC; gray images are repeated to RGB.

  Already-decoded images (uint8 arrays, e.g. from the image-text shard reader) pass
  through with the same channel handling.
  """
  def fn(image, _):
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=0, expand_animations=False)
    image = tf.cast(image, tf.uint8)
    known = image.shape[-1] if image.shape.rank else None
    if channels == 3 and known is not None:  # static channels: no cond needed
      image = tf.image.grayscale_to_rgb(image) if known == 1 else image[..., :3]
    elif channels == 3:
      image = tf.cond(tf.shape(image)[-1] == 1,
                      lambda: tf.image.grayscale_to_rgb(image), lambda: image[..., :3])
    image.set_shape([None, None, channels])
    return image
  return _image_op(fn)


@register("resize")
def resize(size, method: str = "bilinear", antialias: bool = True):
  """Resizes to ``size`` (int or (height, width)); returns float32."""
  def fn(image, _):
    return tf.image.resize(image, _size(size), method=method, antialias=antialias)
  return _image_op(fn)


def _pil_resize(image, size, method: str):
  """Resizes as PIL does on uint8 images: a horizontal pass, then a vertical one,
  each rounded and clipped to [0, 255] (PIL keeps 8 bits between the passes)."""
  def quantize(x):
    return tf.clip_by_value(tf.round(x), 0.0, 255.0)
  image = tf.cast(image, tf.float32)
  image = quantize(tf.image.resize(image, [tf.shape(image)[0], size[1]], method=method,
                                   antialias=True))
  return quantize(tf.image.resize(image, size, method=method, antialias=True))


@register("resize_small")
def resize_small(smaller_side: int, method: str = "bilinear", antialias: bool = True,
                 torchvision: bool = False):
  """Resizes so the shorter side is ``smaller_side``, keeping the aspect ratio.

  ``torchvision=True`` matches torchvision's ``Resize(smaller_side)`` on a PIL image
  (timm's and open_clip's eval transforms) within one level of 255: the long side is
  truncated, not rounded, and the resize is PIL's (``_pil_resize``, antialiased).
  """
  def fn(image, _):
    if torchvision:
      height, width = tf.shape(image)[0], tf.shape(image)[1]
      short, long = tf.minimum(height, width), tf.maximum(height, width)
      new_long = smaller_side * long // short
      size = tf.where(height <= width, tf.stack([smaller_side, new_long]),
                      tf.stack([new_long, smaller_side]))
      return _pil_resize(image, size, method)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = smaller_side / tf.reduce_min(shape)
    new_shape = tf.cast(tf.round(shape * scale), tf.int32)
    return tf.image.resize(image, new_shape, method=method, antialias=antialias)
  return _image_op(fn)


@register("central_crop")
def central_crop(size, torchvision: bool = False):
  """The central ``size`` crop; ``torchvision=True`` rounds the offsets half to even,
  as torchvision's ``CenterCrop`` does (big_vision's, the default, floors them)."""
  def fn(image, _):
    h, w = _size(size)
    if torchvision:
      offset = lambda extra: tf.cast(tf.round(tf.cast(extra, tf.float32) / 2), tf.int32)
    else:
      offset = lambda extra: extra // 2
    top = offset(tf.shape(image)[0] - h)
    left = offset(tf.shape(image)[1] - w)
    return image[top:top + h, left:left + w]
  return _image_op(fn)


@register("random_crop")
def random_crop(size, pad: int = 0):
  """A random ``size`` crop, after zero-padding ``pad`` pixels on every side."""
  def fn(image, example):
    h, w = _size(size)
    if pad:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(image, [h, w, tf.shape(image)[-1]],
                                          seed=_seed(example))
  return _image_op(fn)


@register("random_resized_crop")
def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = "bilinear", antialias: bool = True):
  """Inception-style crop: random area fraction and aspect ratio, then resize."""
  def fn(image, example):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=_seed(example), area_range=scale, aspect_ratio_range=ratio,
        min_object_covered=0.0, max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, _size(size), method=method, antialias=antialias)
  return _image_op(fn)


@register("flip_lr")
def flip_lr():
  def fn(image, example):
    return tf.image.stateless_random_flip_left_right(image, seed=_seed(example))
  return _image_op(fn)


@register("value_range")
def value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0,
                in_max: float = 255.0, clip_values: bool = False):
  """Maps pixel values from [in_min, in_max] linearly to [vmin, vmax] (float32)."""
  def fn(image, _):
    # In TF, not Python: an empty input range gives non-finite pixels, not an exception.
    scale = tf.constant(vmax - vmin, tf.float32) / tf.constant(in_max - in_min, tf.float32)
    image = tf.cast(image, tf.float32) * scale + (vmin - in_min * scale)  # two passes
    return tf.clip_by_value(image, vmin, vmax) if clip_values else image
  return _image_op(fn)


@register("normalize")
def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """``(image/255 - mean) / std``; mean and std are in [0, 1] units (timm's)."""
  if mean == "imagenet":
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  # One multiply and one add per pixel: ((x / 255) - mean) / std, rearranged.
  scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  def fn(image, _):
    return tf.cast(image, tf.float32) * scale + offset
  return _image_op(fn)


@register("keep")
def keep(*keys):
  """Drops every key but ``keys`` (and the pipeline's internal ones)."""
  def op(example):
    return {k: v for k, v in example.items() if k in keys or k.startswith("_")}
  return op


def naflex_grid(height, width, max_patches: int):
  """The patch grid (rows, cols) NaFlex resizes an image to: at most ``max_patches``
  patches, near the image's aspect ratio, at least 1x1."""
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  # Sides at the scale where rows * cols == max_patches, rounded down (so the
  # product fits), at least one patch each.
  scale = tf.sqrt(max_patches / (h * w))
  rows = tf.clip_by_value(tf.floor(h * scale), 1, max_patches)
  cols = tf.clip_by_value(tf.floor(w * scale), 1, tf.floor(max_patches / rows))
  return tf.cast(rows, tf.int32), tf.cast(cols, tf.int32)


def _size_pairs(min_side: int, max_side: int, multiple: int, max_aspect: float):
  """Every (height, width) with sides in ``range(min_side, max_side + 1, multiple)``
  and an aspect ratio within ``1 / max_aspect .. max_aspect``."""
  sides = range(min_side, max_side + 1, multiple)
  return [(h, w) for h in sides for w in sides
          if 1 / max_aspect - 1e-9 <= h / w <= max_aspect + 1e-9]


@register("random_size")
def random_size(min_side: int, max_side: int, multiple: int = 1,
                max_aspect: float = 2.0, method: str = "bilinear", antialias: bool = True):
  """Resizes to a random (height, width), uniform over the pairs with sides in
  ``min_side..max_side`` (multiples of ``multiple``) and aspect ratio at most
  ``max_aspect`` either way: mixed-resolution inputs for NaFlex/NaViT.

  Training draws from the example's seed; without one (evaluation) the size comes from
  a hash of the image's pixels, so every model is tested on the same sizes.
  """
  if not (isinstance(min_side, int) and isinstance(max_side, int)
          and isinstance(multiple, int) and 1 <= min_side <= max_side and multiple >= 1
          and max_aspect >= 1):
    raise ValueError("random_size(min_side, max_side, multiple, max_aspect) takes "
                     "1 <= min_side <= max_side, multiple >= 1, max_aspect >= 1; got "
                     f"({min_side!r}, {max_side!r}, {multiple!r}, {max_aspect!r})")
  pairs = tf.constant(_size_pairs(min_side, max_side, multiple, max_aspect), tf.int32)

  def fn(image, example):
    count = tf.shape(pairs, out_type=tf.int64)[0]
    if "_op_rng" in example:
      index = tf.random.stateless_uniform([], _seed(example), 0, count, dtype=tf.int64)
    else:
      digest = tf.strings.to_hash_bucket_fast(tf.io.serialize_tensor(image), 2**31 - 1)
      index = tf.math.floormod(digest, count)
    return tf.image.resize(image, pairs[index], method=method, antialias=antialias)
  return _image_op(fn)


@register("naflex")
def naflex(patch_size: int, max_patches: int, antialias: bool = True,
           upsample: bool = True):
  """NaFlex (SigLIP 2): aspect-preserving resize to at most ``max_patches`` patches of
  ``patch_size``, patchified and padded to ``max_patches``. ``upsample=False`` keeps
  an image that already fits in its own size (its sides rounded down to whole
  patches, at least one): mixed-resolution inputs stay mixed.

  Replaces ``image`` with ``patches [max_patches, p*p*C]`` (row, column, channel
  order), ``positions [max_patches, 2]`` (row, column), ``segment_ids
  [max_patches]`` (1 for patches, 0 for padding) and ``grid_sizes [1, 2]``: a pack
  of one image for ``vit_jax.models.naflex``, or input to ``vit_jax.data.packing``.
  """
  if not (isinstance(patch_size, int) and patch_size >= 1 and isinstance(max_patches, int)
          and max_patches >= 1):
    raise ValueError(f"naflex(patch_size, max_patches) takes positive integers, got "
                     f"({patch_size!r}, {max_patches!r})")
  p = patch_size

  def op(example):
    example = dict(example)
    image = tf.convert_to_tensor(example.pop("image"))
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    rows, cols = naflex_grid(height, width, max_patches)
    if not upsample:
      own_rows, own_cols = tf.maximum(height // p, 1), tf.maximum(width // p, 1)
      fits = own_rows * own_cols <= max_patches
      rows, cols = tf.where(fits, own_rows, rows), tf.where(fits, own_cols, cols)
    image = tf.image.resize(tf.cast(image, tf.float32), (rows * p, cols * p),
                            antialias=antialias)
    channels = image.shape[-1]
    patches = tf.reshape(tf.transpose(tf.reshape(image, (rows, p, cols, p, channels)),
                                      (0, 2, 1, 3, 4)), (rows * cols, p * p * channels))
    count = rows * cols
    grid_r, grid_c = tf.meshgrid(tf.range(rows), tf.range(cols), indexing="ij")
    positions = tf.stack([tf.reshape(grid_r, [-1]), tf.reshape(grid_c, [-1])], -1)
    pad = max_patches - count
    example["patches"] = tf.ensure_shape(tf.pad(patches, [[0, pad], [0, 0]]),
                                         (max_patches, p * p * channels))
    example["positions"] = tf.ensure_shape(tf.pad(positions, [[0, pad], [0, 0]]),
                                           (max_patches, 2))
    example["segment_ids"] = tf.ensure_shape(
        tf.pad(tf.ones([count], tf.int32), [[0, pad]]), (max_patches,))
    example["grid_sizes"] = tf.reshape(tf.stack([rows, cols]), (1, 2))
    return example
  return op


@register("drop_tokens")
def drop_tokens(rate: float, max_rate: Optional[float] = None):
  """NaViT's token dropping, after ``naflex``: in training an image keeps
  ``ceil((1 - r) * n)`` of its ``n`` patches (at least one), chosen at random and
  kept in raster order, with ``r = rate``, or drawn uniformly from ``[rate,
  max_rate]`` per image (NaViT's continuous dropping). The kept patches keep their
  grid positions (so their position embeddings) and move to the front, the rest
  becomes padding; packing then fits more images per sequence. At evaluation (no
  per-example seed) every patch is kept.
  """
  top = rate if max_rate is None else max_rate
  if not (isinstance(rate, (int, float)) and isinstance(top, (int, float))
          and 0 <= rate <= top < 1):
    raise ValueError(f"drop_tokens(rate, max_rate) takes 0 <= rate <= max_rate < 1, got "
                     f"({rate!r}, {max_rate!r})")

  def op(example):
    if "_op_rng" not in example:
      return example
    if "segment_ids" not in example:
      raise ValueError("drop_tokens works on the naflex op's patches: put it after "
                       "naflex(...) in the pp string")
    example = dict(example)
    rate_seed, order_seed = tf.unstack(
        tf.random.experimental.stateless_split(example["_op_rng"], 2))
    valid = tf.cast(example["segment_ids"], tf.bool)
    length = tf.shape(valid)[0]
    count = tf.reduce_sum(tf.cast(valid, tf.int32))
    drawn = tf.random.stateless_uniform([], rate_seed, rate, top) if top > rate else rate
    kept = tf.maximum(1, tf.cast(tf.math.ceil(
        (1.0 - drawn) * tf.cast(count, tf.float32)), tf.int32))
    # Padding sorts last (score 2): the first ``kept`` are a random subset of patches.
    scores = tf.where(valid, tf.random.stateless_uniform([length], order_seed), 2.0)
    chosen = tf.sort(tf.argsort(scores)[:kept])
    pad = length - kept
    for key in ("patches", "positions"):
      picked = tf.gather(example[key], chosen)
      example[key] = tf.ensure_shape(tf.pad(picked, [[0, pad], [0, 0]]),
                                     example[key].shape)
    example["segment_ids"] = tf.ensure_shape(
        tf.pad(tf.ones([kept], example["segment_ids"].dtype), [[0, pad]]),
        example["segment_ids"].shape)
    return example
  return op

