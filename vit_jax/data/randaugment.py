"""RandAugment (Cubuk et al., 2020) as a preprocessing op: ``randaug(2, 10)``.

  pp_train = "decode|random_resized_crop(224)|flip_lr|randaug(2, 10)|value_range(-1, 1)"

Applies ``num_layers`` operations drawn uniformly (with replacement) from the list
below, each at ``magnitude`` out of 10 with a random sign where it has one, on
images with values in [0, 255] (put it before ``value_range``/``normalize``). The
ranges follow the paper and timm's ``rand_augment_transform`` (rotate 30 degrees,
shear 0.3, translate 45% of the side, enhance factors 1 +- 0.9). Random draws come
from the example's stateless seed, so a seed gives the same images every time.
"""

import math

import tensorflow as tf

from vit_jax.data import preprocess

GRAY = 128.0


def _blend(a, b, factor):
  """``b + factor * (a - b)``: factor 0 is ``b``, 1 is ``a``, >1 extrapolates."""
  return tf.clip_by_value(b + factor * (a - b), 0.0, 255.0)


def _gray(image):
  return tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def _transform(image, matrix):
  """Projective transform (output -> input coordinates), gray fill, nearest."""
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
      output_shape=tf.shape(image)[:2], fill_value=GRAY, interpolation="NEAREST",
      fill_mode="CONSTANT")[0]


def identity(image, _):
  return image


def auto_contrast(image, _):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-3), 1.0)
  return tf.where(hi > lo, (image - lo) * scale, image)


def equalize(image, _):
  """Histogram equalisation per channel (PIL's ImageOps.equalize)."""
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.math.bincount(tf.reshape(c, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.where(step > 0, tf.gather(lut, c), c), tf.float32)
  return tf.stack([channel(image[..., i]) for i in range(image.shape[-1])], axis=-1)


def rotate(image, v):
  angle = v * 30.0 * math.pi / 180.0
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Maps an output pixel to the input pixel it comes from (rotation about the centre).
  return _transform(image, [cos, -sin, cx - cx * cos + cy * sin,
                            sin, cos, cy - cx * sin - cy * cos, 0.0, 0.0])


def shear_x(image, v):
  return _transform(image, [1.0, v * 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, v):
  return _transform(image, [1.0, 0.0, 0.0, v * 0.3, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, v):
  dx = v * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, [1.0, 0.0, dx, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, v):
  dy = v * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, dy, 0.0, 0.0])


def solarize(image, v):
  threshold = 256.0 - tf.abs(v) * 256.0
  return tf.where(image >= threshold, 255.0 - image, image)


def posterize(image, v):
  bits = 8 - tf.cast(tf.round(tf.abs(v) * 4.0), tf.int32)
  shift = tf.cast(8 - bits, tf.uint8)
  as_int = tf.cast(image, tf.uint8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(as_int, shift), shift),
                 tf.float32)


def color(image, v):
  gray = tf.broadcast_to(_gray(image), tf.shape(image))
  return _blend(image, gray, 1.0 + 0.9 * v)


def contrast(image, v):
  mean = tf.reduce_mean(_gray(image))
  return _blend(image, tf.fill(tf.shape(image), mean), 1.0 + 0.9 * v)


def brightness(image, v):
  return _blend(image, tf.zeros_like(image), 1.0 + 0.9 * v)


def sharpness(image, v):
  """Blends with PIL's SMOOTH filter (centre 5, neighbours 1, /13); borders kept."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2, channels]), [[1, 1], [1, 1], [0, 0]])
  smooth = inner * smooth + (1 - inner) * image
  return _blend(image, smooth, 1.0 + 0.9 * v)


# (operation, whether the magnitude takes a random sign)
OPS = [(identity, False), (auto_contrast, False), (equalize, False), (rotate, True),
       (solarize, False), (color, True), (posterize, False), (contrast, True),
       (brightness, True), (sharpness, True), (shear_x, True), (shear_y, True),
       (translate_x, True), (translate_y, True)]


@preprocess.register("randaug")
def randaug(num_layers: int = 2, magnitude: float = 10.0):
  """``num_layers`` random operations at ``magnitude`` (0-10, as in the paper)."""
  if not 0 <= magnitude <= 10:
    raise ValueError(f"randaug magnitude must be in [0, 10], got {magnitude}")
  level = magnitude / 10.0

  def fn(image, example):
    dtype = image.dtype
    image = tf.cast(image, tf.float32)
    image.set_shape([None, None, image.shape[-1] or 3])
    seed = preprocess._seed(example)  # pylint: disable=protected-access
    for layer in range(num_layers):
      layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
      which = tf.random.stateless_uniform([], layer_seed, 0, len(OPS), dtype=tf.int32)
      sign = tf.where(tf.random.stateless_uniform(
          [], tf.random.experimental.stateless_fold_in(layer_seed, 1)) < 0.5, -1.0, 1.0)
      branches = [
          (lambda op=op, signed=signed: op(image, (sign if signed else 1.0) * level))
          for op, signed in OPS]
      image = tf.clip_by_value(tf.switch_case(which, branches), 0.0, 255.0)
    return tf.cast(image, dtype) if dtype != tf.uint8 else tf.cast(
        tf.round(image), tf.uint8)

  return preprocess._image_op(fn)  # pylint: disable=protected-access
