r"""Post-training quantization of a classification workdir's model (qwix).

  python -m vit_jax.tools.quantize --workdir=workdirs/digits_demo --mode=int8

Evaluates the float and the quantized model side by side on the run's eval split,
writes the quantized parameters (Orbax, int8/int4 values with float scales) to
``<workdir>/quantized_<mode>`` (or ``--out``) with ``quantization.json`` naming the
model and mode, and prints one JSON line: top-1 of both, bytes of the float and
quantized arrays and of the written checkpoint.
Modes: ``vit_jax.quantization.MODES``.
"""

import json

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A classification training workdir.", required=True)
  flags.DEFINE_string("mode", "int8", "int8 (w8a8), int4 (weight-only), w4a8 or fp8.")
  flags.DEFINE_string("targets", ".*", "Regex of the module paths to quantize.")
  flags.DEFINE_string("exclude", None, "Regex of module paths kept float.")
  flags.DEFINE_string("out", None, "Where to write (default <workdir>/quantized_<mode>).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def quantize_workdir(path: str, settings, out=None, step=None) -> dict:
  """Quantizes and evaluates the run in ``path``; returns the numbers printed."""
  # Imported here: --help answers without starting JAX and TensorFlow.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, models, quantization, sharding, workdir  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import classification  # pylint: disable=g-import-not-at-top

  path = checkpoint.absolute(path)
  config = json.loads((path / "config.json").read_text())
  variables, directory = workdir.read_variables(path, step)
  meta = json.loads((directory / "meta" / "metadata").read_text())
  model = models.create(meta["model_name"], **meta["model"])
  inputs = config["input"]
  builder = input_pipeline.get_builder(inputs["dataset"], inputs.get("data_dir"),
                                       download=False)
  mesh = sharding.make_mesh({"data": -1})

  def evaluate(model, variables):
    evaluator = classification.ClassificationEvaluator(
        lambda v, x: model.apply(v, x, train=False), builder, inputs["eval_split"],
        preprocess_fn=preprocess.parse(inputs["pp_eval"]),
        batch_size=inputs.get("eval_batch_size") or inputs["batch_size"],
        sharding=sharding.batch_sharding(mesh), keep_labels=inputs.get("classes"))
    with jax.set_mesh(mesh):
      return evaluator.run(variables), evaluator.image_shape

  float_result, image_shape = evaluate(model, variables)
  sample = jnp.zeros((1,) + image_shape, jnp.float32)
  qmodel, qvariables = quantization.ptq(model, variables, settings, sample)
  quant_result, _ = evaluate(qmodel, qvariables)

  out = epath.Path(checkpoint.absolute(out or path / f"quantized_{settings.mode}"))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / "params", quantization.to_storage(qvariables), force=True)
    checkpointer.wait_until_finished()
  (out / "quantization.json").write_text(json.dumps({
      "model_name": meta["model_name"], "model": meta["model"], "step": meta["step"],
      "mode": settings.mode, "targets": settings.targets, "exclude": settings.exclude}))
  return {"step": meta["step"], "mode": settings.mode,
          "float_top1": float_result["top1"], "quantized_top1": quant_result["top1"],
          "count": quant_result["count"],
          "float_param_bytes": quantization.tree_bytes(variables),
          "quantized_param_bytes": quantization.tree_bytes(qvariables),
          "quantized_checkpoint_bytes": quantization.directory_bytes(out / "params"),
          "out": str(out)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from vit_jax import quantization  # pylint: disable=g-import-not-at-top
  settings = quantization.Settings(mode=FLAGS.mode, targets=FLAGS.targets,
                                   exclude=FLAGS.exclude)
  print(json.dumps(quantize_workdir(FLAGS.workdir, settings, FLAGS.out, FLAGS.step)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
