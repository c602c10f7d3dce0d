r"""A trained classification workdir evaluated at other patch sizes (FlexiViT).

  python -m vit_jax.tools.flexi_eval --workdir=workdirs/digits_flexi_p8 \
      --patch_sizes=8,16 --image_sizes=32,64 --methods=pi,bilinear

For every (patch size, image size, kernel resize method) the run's ViT evaluates its
eval split with the stored ``embedding`` kernel resized (``pi``: FlexiViT's
pseudo-inverse resize; ``bilinear``: resized like an image) and the position table
resampled to the grid; the eval pp string is the run's with every ``resize(N)``
replaced by the image size. Prints one JSON line per setting.
"""

import json
import re

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A classification training workdir.", required=True)
  flags.DEFINE_list("patch_sizes", ["16"], "Patch sizes to run at.")
  flags.DEFINE_list("image_sizes", [], "Eval image sides (default: the run's).")
  flags.DEFINE_list("methods", ["pi", "bilinear"], "Kernel resize methods.")
  flags.DEFINE_string("data_dir", None, "The TFDS data directory (default: the run's).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here: --help answers without starting JAX and TensorFlow.
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models, sharding, workdir  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import classification  # pylint: disable=g-import-not-at-top

  path = workdir.step_dir(FLAGS.workdir).parent.parent
  config = json.loads((path / "config.json").read_text())
  builder = input_pipeline.get_builder(config["input"]["dataset"],
                                       FLAGS.data_dir or config["input"]["data_dir"])
  num_classes = builder.info.features["label"].num_classes
  variables, _ = workdir.read_variables(FLAGS.workdir)
  mesh = sharding.make_mesh({"data": -1})
  pp_eval = config["input"]["pp_eval"]
  image_sizes = FLAGS.image_sizes or [None]
  for size in image_sizes:
    pp = pp_eval if size is None else re.sub(r"resize\(\d+\)", f"resize({size})", pp_eval)
    for patch in FLAGS.patch_sizes:
      for method in FLAGS.methods:
        model = models.create(config["model_name"], num_classes=num_classes,
                              **{**config["model"], "flexi_patch_size": int(patch),
                                 "flexi_resize": method})
        evaluator = classification.ClassificationEvaluator(
            lambda v, x, model=model: model.apply(v, x), builder,
            config["input"]["eval_split"], preprocess_fn=preprocess.parse(pp),
            batch_size=config["input"].get("eval_batch_size") or 256,
            sharding=sharding.batch_sharding(mesh))
        with jax.set_mesh(mesh):
          result = evaluator.run(variables)
        print(json.dumps({"patch_size": int(patch), "image_size": size, "method": method,
                          "pp": pp, **result}), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
