r"""Image<->text retrieval recall of a trained two-tower model (a workdir).

  python -m vit_jax.tools.retrieval --workdir=workdirs/clip_digits \
      --shards='workdirs/digits_pool/eval/*.tar'

Prints one JSON line: the checkpoint's step, recall@1/5/10 image->text and
text->image (``vit_jax.evaluators.retrieval``) and the pair count.
"""

import json

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A contrastive training workdir.", required=True)
  flags.DEFINE_string("shards", None, "Held-out image-text shards (glob, brace range, "
                      "directory or comma list).", required=True)
  flags.DEFINE_string("pp", None, "Image preprocessing (default: the run's pp_eval).")
  flags.DEFINE_integer("batch_size", 256, "Pairs per step.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here: --help answers without starting JAX and TensorFlow.
  from vit_jax.evaluators import common, retrieval  # pylint: disable=g-import-not-at-top
  settings = {"shards": FLAGS.shards, "pp": FLAGS.pp}
  print(json.dumps(common.evaluate_workdir(retrieval.from_config, FLAGS.workdir,
                                           settings, batch_size=FLAGS.batch_size)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
