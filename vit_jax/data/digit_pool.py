"""An offline image-text pool: scikit-learn's digits rendered as captioned scenes.

The scenes, captions and split; ``python -m vit_jax.tools.make_pool`` writes a pool of
them as shards, and the ``digit_scenes`` TFDS dataset renders its images here too.

Each sample is one handwritten digit (the 8x8 images inside scikit-learn) drawn in a
colour on a background, small in a corner or large in the centre, on an
``image_size`` canvas, with a caption from one of many templates. Most name only the
digit ("a handwritten seven"); ``attribute_fraction`` of them also name some of the
attributes ("a small red seven in the top left corner").
A ``mismatch_fraction`` of the training samples get the caption of another scene
showing a different digit (noise, as in web-scraped pools); the JSON metadata records
which (``"mismatched"``), so filtering can be scored.

The digit split is the one of the ``digits`` TFDS dataset (stratified, seed 0), so the
held-out digits were never seen in training, and the zero-shot prompt templates
(``vit_jax.evaluators.zero_shot.TEMPLATES["digits_heldout"]``) are not among the
caption templates used here.
"""

import functools
import io

import numpy as np

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
FOREGROUNDS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 90, 255),
               "yellow": (240, 230, 50), "white": (245, 245, 245),
               "orange": (250, 150, 30), "pink": (250, 120, 200),
               "cyan": (60, 230, 230)}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (110, 110, 110), "navy": (20, 30, 90),
               "brown": (100, 60, 30), "dark green": (20, 70, 35),
               "purple": (80, 30, 100)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
DEFAULT_ATTRIBUTE_FRACTION = 0.1  # see ATTRIBUTE_TEMPLATES

# Caption templates of the training pool. Slots: {digit} (the word), {numeral},
# {color}, {bg}, {size}, {where} ("in the top left corner" / "in the middle").
DIGIT_TEMPLATES = (
    "a handwritten {digit}",
    "the digit {digit}",
    "{digit}",
    "the number {numeral}",
    "digit: {digit}",
    "a {digit} written by hand",
    "handwriting showing the number {digit}",
    "the handwritten digit {numeral} ({digit})",
    "a sketch of {digit}",
    "someone wrote a {digit}",
    "number {digit}",
    "a drawn {numeral}",
    "{numeral}, also known as {digit}",
    "a quickly written {digit}",
    "the numeral {digit}",
    "an example of the digit {numeral}",
    "one handwritten digit: {digit}",
    "a neat {digit}",
)
# The digit and some of its attributes. Only ``attribute_fraction`` of the captions
# (DEFAULT_ATTRIBUTE_FRACTION) use these: a small CLIP learns colours (easy) long
# before the digits' shapes (hard), and captions that let it tell same-digit pairs
# apart by colour pull its capacity away from the shapes.
ATTRIBUTE_TEMPLATES = (
    "a {color} {digit} on a {bg} background",
    "a {size} {color} {digit} {where}",
    "{color} ink, digit {digit}, {bg} paper",
    "the {digit} is {color} and the background is {bg}",
    "a {size} {digit} {where}",
    "a {digit} drawn with a {color} pen",
)


def render(digit: np.ndarray, rng: np.random.Generator, image_size: int) -> tuple:
  """Draws one 8x8 digit (values 0..16); returns the uint8 image and its attributes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  color = str(rng.choice(list(FOREGROUNDS)))
  background = str(rng.choice(list(BACKGROUNDS)))
  size = "small" if rng.random() < 0.5 else "large"
  fg = np.array(FOREGROUNDS[color], np.float32) + rng.normal(0, 8, 3)
  bg = np.array(BACKGROUNDS[background], np.float32) + rng.normal(0, 8, 3)
  side = int(round(image_size * (rng.uniform(0.55, 0.65) if size == "small"
                                 else rng.uniform(0.8, 0.95))))
  glyph = Image.fromarray(np.uint8(digit * (255 / 16))).resize((side, side),
                                                               Image.BILINEAR)
  alpha = np.asarray(glyph, np.float32)[..., None] / 255.0
  canvas = np.empty((image_size, image_size, 3), np.float32)
  canvas[:] = bg
  jitter = lambda: int(rng.integers(0, max(image_size // 16, 1) + 1))
  if size == "small":
    where = str(rng.choice(CORNERS))
    top = jitter() if where.startswith("top") else image_size - side - jitter()
    left = jitter() if where.endswith("left") else image_size - side - jitter()
    where_text = f"in the {where} corner"
  else:
    where = "center"
    top = (image_size - side) // 2 + int(rng.integers(-1, 2))
    left = (image_size - side) // 2 + int(rng.integers(-1, 2))
    top, left = np.clip([top, left], 0, image_size - side)
    where_text = "in the middle"
  patch = canvas[top:top + side, left:left + side]
  canvas[top:top + side, left:left + side] = alpha * fg + (1 - alpha) * patch
  canvas += rng.normal(0, 4, canvas.shape)  # sensor noise
  image = np.uint8(np.clip(np.round(canvas), 0, 255))
  return image, {"color": color, "bg": background, "size": size, "where": where_text,
                 "position": where}


def caption(label: int, attributes: dict, rng: np.random.Generator,
            attribute_fraction: float = DEFAULT_ATTRIBUTE_FRACTION) -> str:
  """A training caption: an attribute template with ``attribute_fraction`` odds."""
  with_attributes = rng.random() < attribute_fraction
  template = str(rng.choice(list(ATTRIBUTE_TEMPLATES if with_attributes
                                 else DIGIT_TEMPLATES)))
  return template.format(digit=CLASS_NAMES[label], numeral=str(label), **{
      k: attributes[k] for k in ("color", "bg", "size", "where")})


def encode_image(image: np.ndarray, image_format: str) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  if image_format == "jpg":
    # 4:4:4 chroma: at 32x32, subsampled colour would smear the thin strokes.
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
  else:
    Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


# The held-out split of the ``digits`` TFDS dataset, which the pool shares.
NUM_TEST = 360
SPLIT_SEED = 0


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, test) indices of scikit-learn's digits: stratified, fixed seed."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED)
  return np.sort(train), np.sort(test)


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images, train labels, test images, test labels) of the digits TFDS split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  train, test = split_indices(digits.target)
  return (digits.images[train], digits.target[train], digits.images[test],
          digits.target[test])
