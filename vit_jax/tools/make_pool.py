r"""Writes the offline image-text pool (``vit_jax.data.digit_pool``) to a directory.

  python -m vit_jax.tools.make_pool --output_dir=workdirs/digits_pool \
      --num_samples=30000 --mismatch_fraction=0.0

See ``vit_jax.data.digit_pool`` for what a sample is.

Output::

  train/pool-00000.tar ...     from the 1,437 training digits (``num_samples``)
  eval/heldout-00000.tar ...   the 360 held-out digits, each drawn ``eval_renders``
                               times, clean captions that always name attributes too
                               (so retrieval must find the scene, not just the
                               digit), JSON ``label``
  tokenizer.json               BPE vocabulary trained on the training captions
  pool.json                    settings and counts
"""

import json
import os

import numpy as np
from etils import epath
from absl import app, flags

from vit_jax.data import image_text, tokenizer
from vit_jax.data.digit_pool import (CLASS_NAMES, DEFAULT_ATTRIBUTE_FRACTION, caption,
                                     digits_split, encode_image, render)

FLAGS = flags.FLAGS


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
  (epath.Path(output_dir) / "pool.json").write_text(json.dumps(info, indent=2))
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
