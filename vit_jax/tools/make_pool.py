r"""An offline image-text pool: scikit-learn's digits rendered as captioned scenes.

  python -m vit_jax.tools.make_pool --output_dir=workdirs/digits_pool \
      --num_samples=30000 --mismatch_fraction=0.0

Each sample is one handwritten digit (the 8x8 images inside scikit-learn) drawn in a
colour on a background, small in a corner or large in the centre, on an
``image_size`` canvas, with a caption from one of many templates. Most name only the
digit ("a handwritten seven"); ``attribute_fraction`` of them also name some of the
attributes ("a small red seven in the top left corner").
A ``mismatch_fraction`` of the training samples get the caption of another scene
showing a different digit (noise, as in web-scraped pools); the JSON metadata records
which (``"mismatched"``), so filtering can be scored.

Output::

  train/pool-00000.tar ...     from the 1,437 training digits (``num_samples``)
  eval/heldout-00000.tar ...   the 360 held-out digits, each drawn ``eval_renders``
                               times, clean captions that always name attributes too
                               (so retrieval must find the scene, not just the
                               digit), JSON ``label``
  tokenizer.json               BPE vocabulary trained on the training captions
  pool.json                    settings and counts

The digit split is the one of the ``digits`` TFDS dataset (stratified, seed 0), so the
held-out digits were never seen in training, and the zero-shot prompt templates
(``vit_jax.evaluators.zero_shot.TEMPLATES["digits_heldout"]``) are not among the
caption templates used here.
"""

import functools
import io
import json
import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

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


@functools.lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images, train labels, test images, test labels) of the digits TFDS split."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  from vit_jax.data.digits import NUM_TEST, SPLIT_SEED  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  indices = np.arange(len(digits.images))
  train, test = model_selection.train_test_split(
      indices, test_size=NUM_TEST, stratify=digits.target, random_state=SPLIT_SEED)
  train, test = np.sort(train), np.sort(test)
  return (digits.images[train], digits.target[train], digits.images[test],
          digits.target[test])


def write_samples(writer, images, labels, *, count: int, seed: int, image_size: int,
                  image_format: str, mismatch_fraction: float, prefix: str,
                  sequential: bool, attribute_fraction: float) -> dict:
  """Renders ``count`` samples into ``writer``; returns counts for pool.json."""
  mismatched_total = 0
  captions = []
  for i in range(count):
    # Independent streams: the scene and clean caption of sample i do not depend on
    # the mismatch fraction, so noisy and clean pools hold the same images.
    rng = np.random.default_rng([seed, i])
    noise_rng = np.random.default_rng([seed, i, 1])
    index = i % len(images) if sequential else int(rng.integers(len(images)))
    label = int(labels[index])
    image, attributes = render(images[index], rng, image_size)
    text = caption(label, attributes, rng, attribute_fraction)
    mismatched = bool(noise_rng.random() < mismatch_fraction)
    if mismatched:  # the caption of another scene, showing a different digit
      other = int((label + noise_rng.integers(1, 10)) % 10)
      _, other_attributes = render(images[0], noise_rng, image_size)
      text = caption(other, other_attributes, noise_rng, attribute_fraction)
      mismatched_total += 1
    key = f"{prefix}{i:08d}"
    meta = {"uid": key, "label": label, "class_name": CLASS_NAMES[label],
            "source_index": int(index), "mismatched": mismatched,
            "color": attributes["color"], "background": attributes["bg"],
            "size": attributes["size"], "position": attributes["position"]}
    writer.write(key, {image_format: encode_image(image, image_format), "txt": text,
                       "json": json.dumps(meta)})
    captions.append(text)
  return {"samples": count, "mismatched": mismatched_total, "captions": captions}


def make_pool(output_dir: str, *, num_samples: int = 30000, mismatch_fraction: float = 0.0,
              image_size: int = 32, samples_per_shard: int = 1000, eval_renders: int = 3,
              seed: int = 0, vocab_size: int = 1000, context_length: int = 24,
              image_format: str = "jpg",
              attribute_fraction: float = DEFAULT_ATTRIBUTE_FRACTION) -> dict:
  from vit_jax.data import image_text, tokenizer  # pylint: disable=g-import-not-at-top
  if not 0.0 <= mismatch_fraction < 1.0:
    raise ValueError(f"mismatch_fraction={mismatch_fraction} must be in [0, 1)")
  if not 0.0 <= attribute_fraction <= 1.0:
    raise ValueError(f"attribute_fraction={attribute_fraction} must be in [0, 1]")
  if image_format not in ("jpg", "png"):
    raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
  train_images, train_labels, test_images, test_labels = digits_split()
  with image_text.ShardWriter(os.path.join(output_dir, "train", "pool-{:05d}.tar"),
                              samples_per_shard) as writer:
    train = write_samples(writer, train_images, train_labels, count=num_samples,
                          seed=seed, image_size=image_size, image_format=image_format,
                          mismatch_fraction=mismatch_fraction, prefix="",
                          sequential=False, attribute_fraction=attribute_fraction)
  with image_text.ShardWriter(os.path.join(output_dir, "eval", "heldout-{:05d}.tar"),
                              samples_per_shard) as eval_writer:
    held_out = write_samples(eval_writer, test_images, test_labels,
                             count=len(test_images) * eval_renders, seed=seed + 1_000_003,
                             image_size=image_size, image_format=image_format,
                             mismatch_fraction=0.0, prefix="eval", sequential=True,
                             attribute_fraction=1.0)
  tok = tokenizer.train_bpe(train.pop("captions"), vocab_size=vocab_size,
                            context_length=context_length)
  tok.save(os.path.join(output_dir, "tokenizer.json"))
  held_out.pop("captions")
  info = {"train": {**train, "shards": len(writer.paths)},
          "eval": {**held_out, "shards": len(eval_writer.paths)},
          "image_size": image_size, "mismatch_fraction": mismatch_fraction, "seed": seed,
          "attribute_fraction": attribute_fraction,
          "tokenizer_vocab_size": tok.vocab_size, "class_names": list(CLASS_NAMES),
          "image_format": image_format}
  with open(os.path.join(output_dir, "pool.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def define_flags() -> None:
  flags.DEFINE_string("output_dir", None, "Where the pool is written.", required=True)
  flags.DEFINE_integer("num_samples", 30000, "Training samples.")
  flags.DEFINE_float("mismatch_fraction", 0.0, "Share of training samples given the "
                     "caption of another digit's scene.")
  flags.DEFINE_integer("image_size", 32, "Side of the square images, in pixels.")
  flags.DEFINE_integer("samples_per_shard", 1000, "Samples per .tar shard.")
  flags.DEFINE_integer("eval_renders", 3, "Renders of each held-out digit.")
  flags.DEFINE_integer("seed", 0, "Seed of the scenes and captions.")
  flags.DEFINE_integer("vocab_size", 1000, "Vocabulary of the BPE tokenizer trained on "
                       "the captions.")
  flags.DEFINE_enum("image_format", "jpg", ("jpg", "png"), "Image encoding.")
  flags.DEFINE_float("attribute_fraction", DEFAULT_ATTRIBUTE_FRACTION,
                     "Share of captions that also name colours, size, position.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  info = make_pool(FLAGS.output_dir, num_samples=FLAGS.num_samples,
                   mismatch_fraction=FLAGS.mismatch_fraction, image_size=FLAGS.image_size,
                   samples_per_shard=FLAGS.samples_per_shard,
                   eval_renders=FLAGS.eval_renders, seed=FLAGS.seed,
                   vocab_size=FLAGS.vocab_size, image_format=FLAGS.image_format,
                   attribute_fraction=FLAGS.attribute_fraction)
  print(f"wrote {info['train']['samples']} training samples ({info['train']['mismatched']} "
        f"with mismatched captions) in {info['train']['shards']} shards and "
        f"{info['eval']['samples']} held-out samples to {FLAGS.output_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
