r"""Zero-shot classification accuracy of a trained two-tower model (a workdir).

  python -m vit_jax.tools.zero_shot --workdir=workdirs/clip_digits \
      --shards='workdirs/digits_pool/eval/*.tar' --classnames=digits \
      --templates=digits_heldout

Images come from labelled image-text shards (``--shards``, a ``label`` in each
sample's JSON) or a TFDS classification dataset (``--dataset``). ``--classnames`` and
``--templates`` take a named set of ``vit_jax.evaluators.zero_shot`` or a file (one
entry per line, or a JSON list); templates contain ``{}`` where the class name goes.
Prints one JSON line: the checkpoint's step, top-1, top-5 and the image count.
"""

import json

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A contrastive training workdir.", required=True)
  flags.DEFINE_string("shards", None, "Labelled image-text shards (glob, brace range, "
                      "directory or comma list).")
  flags.DEFINE_string("label_key", "label", "JSON field holding the label.")
  flags.DEFINE_string("dataset", None, "Or a TFDS classification dataset.")
  flags.DEFINE_string("split", "test", "The TFDS split.")
  flags.DEFINE_string("data_dir", None, "The TFDS data directory.")
  flags.DEFINE_string("classnames", None, "A named set or a file.", required=True)
  flags.DEFINE_string("templates", None, "A named set or a file.", required=True)
  flags.DEFINE_string("pp", None, "Image preprocessing (default: the run's pp_eval).")
  flags.DEFINE_integer("batch_size", 256, "Images per step.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here: --help answers without starting JAX and TensorFlow.
  from vit_jax.evaluators import common, zero_shot  # pylint: disable=g-import-not-at-top
  settings = {name: FLAGS[name].value for name in (
      "classnames", "templates", "pp", "shards", "label_key", "dataset", "split",
      "data_dir")}
  print(json.dumps(common.evaluate_workdir(zero_shot.from_config, FLAGS.workdir,
                                           settings, batch_size=FLAGS.batch_size)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
