r"""Train a BPE tokenizer on the captions of image-text ``.tar`` shards.

  python -m vit_jax.tools.train_tokenizer --shards='pool/train/*.tar' \
      --vocab_size=2000 --output=pool/tokenizer.json

Writes a Hugging Face ``tokenizers`` JSON file that ``tokenizer.path`` of the
contrastive configs loads (``vit_jax.data.tokenizer``).
"""

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("shards", None, "Shard files: glob, brace range, directory or "
                      "comma list.", required=True)
  flags.DEFINE_string("output", None, "The tokenizer.json to write.", required=True)
  flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size.")
  flags.DEFINE_integer("min_frequency", 2, "Fewest occurrences of a merged pair.")
  flags.DEFINE_integer("max_captions", 0, "Train on the first N captions only (0: all).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here: --help answers without starting TensorFlow.
  from vit_jax.data import image_text, tokenizer  # pylint: disable=g-import-not-at-top
  shards = image_text.expand_shards(FLAGS.shards)
  captions = image_text.iterate_captions(shards, limit=FLAGS.max_captions or None)
  tok = tokenizer.train_bpe(captions, vocab_size=FLAGS.vocab_size, context_length=77,
                            min_frequency=FLAGS.min_frequency)
  tok.save(FLAGS.output)
  print(f"wrote {FLAGS.output}: vocabulary of {tok.vocab_size} tokens from "
        f"{len(shards)} shards")


if __name__ == "__main__":
  define_flags()
  app.run(main)
