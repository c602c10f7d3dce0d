r"""Post-training quantization of a training workdir's model (qwix).

  python -m vit_jax.tools.quantize --workdir=workdirs/digits_demo --mode=int8
  python -m vit_jax.tools.quantize --workdir=workdirs/clip_digits --mode=int8

Evaluates the float and the quantized model side by side, writes the quantized
parameters (Orbax, int8/int4 values with float scales) to ``<workdir>/quantized_<mode>``
(or ``--out``) with ``quantization.json`` naming the model and mode, and prints one
JSON line: the accuracies of both, bytes of the float and quantized arrays and of the
written checkpoint. A classification run is evaluated on its eval split (top-1); a
contrastive run (a workdir with ``model.json``; both towers are quantized) by the
zero-shot evaluations of its config (``zero_shot/<name>/top1``).
Modes: ``vit_jax.quantization.MODES``.
"""

import dataclasses
import json

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A classification or contrastive training "
                      "workdir.", required=True)
  flags.DEFINE_string("mode", "int8", "int8 (w8a8), int4 (weight-only), w4a8 or fp8.")
  flags.DEFINE_string("targets", ".*", "Regex of the module paths to quantize.")
  flags.DEFINE_string("exclude", None, "Regex of module paths kept float.")
  flags.DEFINE_string("out", None, "Where to write (default <workdir>/quantized_<mode>).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("calibration_batches", 0, "Static activation scales for the dense "
                       "layers from this many training batches (eval preprocessing); 0: "
                       "scales computed at run time (dynamic). Classification runs.")


def quantize_workdir(path: str, settings, out=None, step=None,
                     calibration_batches: int = 0) -> dict:
  """Quantizes and evaluates the run in ``path``; returns the numbers printed."""
  # Imported here: --help answers without starting JAX and TensorFlow.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, models, quantization, sharding, workdir  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import classification  # pylint: disable=g-import-not-at-top

  path = checkpoint.absolute(path)
  if (path / workdir.MODEL_FILE).exists():
    if calibration_batches:
      raise ValueError("--calibration_batches: static scales are built for "
                       "classification workdirs only; a contrastive run is quantized "
                       "with dynamic scales (leave it 0)")
    return _quantize_contrastive(path, settings, out, step)
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
  quant_stats = None
  if calibration_batches:  # static range: scales from the training split
    settings = dataclasses.replace(settings, static=True)
    dataset, _ = input_pipeline.make_eval_dataset(
        builder, inputs["train_split"], preprocess_fn=preprocess.parse(inputs["pp_eval"]),
        batch_size=inputs["batch_size"], cache=False)
    batches = dataset.take(calibration_batches).as_numpy_iterator()
    quant_stats = quantization.calibrate(model, variables, settings,
                                         (batch["image"] for batch in batches))
  qmodel, qvariables = quantization.ptq(model, variables, settings, sample, quant_stats)
  quant_result, _ = evaluate(qmodel, qvariables)

  out = _write(path, out, settings, qvariables, meta["model_name"], meta["model"],
               meta["step"])
  return {"step": meta["step"], "mode": settings.mode,
          "static_activation_scales": settings.static, "float_top1": float_result["top1"], "quantized_top1": quant_result["top1"],
          "count": quant_result["count"], **_sizes(variables, qvariables, out)}


def _write(path, out, settings, qvariables, model_name, model_kwargs, step):
  """The quantized checkpoint and its ``quantization.json``; returns the directory."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, quantization  # pylint: disable=g-import-not-at-top
  out = epath.Path(checkpoint.absolute(out or path / f"quantized_{settings.mode}"))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out / "params", quantization.to_storage(qvariables), force=True)
    checkpointer.wait_until_finished()
  (out / "quantization.json").write_text(json.dumps({
      "model_name": model_name, "model": model_kwargs, "step": step,
      "mode": settings.mode, "targets": settings.targets, "exclude": settings.exclude,
      "static": settings.static}))
  return out


def _sizes(variables, qvariables, out) -> dict:
  from vit_jax import quantization  # pylint: disable=g-import-not-at-top
  return {"float_param_bytes": quantization.tree_bytes(variables),
          "quantized_param_bytes": quantization.tree_bytes(qvariables),
          "quantized_checkpoint_bytes": quantization.directory_bytes(out / "params"),
          "out": str(out)}


def _quantize_contrastive(path, settings, out=None, step=None) -> dict:
  """``quantize_workdir`` for a two-tower run: zero-shot of float and quantized."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax import quantization, sharding, workdir  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import zero_shot  # pylint: disable=g-import-not-at-top

  config = json.loads((path / "config.json").read_text())
  entries = (config.get("evals") or {}).get("zero_shot") or {}
  entries = {name: e for name, e in entries.items() if e.get("classnames")}
  if not entries:
    raise ValueError(f"{path}: the run's config has no zero-shot evaluation "
                     "(evals.zero_shot.<name> with classnames) to compare float and "
                     "quantized by")
  trained = workdir.load_trained(path, step)
  mesh = sharding.make_mesh({"data": -1})
  batch_size = config["input"].get("eval_batch_size") or config["input"]["batch_size"]

  def evaluate(model, variables):
    results = {}
    for name, entry in entries.items():
      evaluator = zero_shot.from_config(
          ml_collections.ConfigDict({**entry, "pp": entry.get("pp") or trained.pp_eval}),
          model, trained.tokenizer, sharding=sharding.batch_sharding(mesh),
          batch_size=batch_size)
      with jax.set_mesh(mesh):
        results[name] = evaluator.run(variables)
    return results

  float_results = evaluate(trained.model, trained.variables)
  # The two-tower init builds the text tower too from an image batch alone.
  sample = jnp.zeros((1, *trained.model.image_size(), 3), jnp.float32)
  qmodel, qvariables = quantization.ptq(trained.model, trained.variables, settings, sample)
  quant_results = evaluate(qmodel, qvariables)
  out = _write(path, out, settings, qvariables, trained.info["model_name"],
               trained.info["model"], trained.step)
  numbers = {"step": trained.step, "mode": settings.mode}
  for name in entries:
    numbers[f"float_zero_shot/{name}/top1"] = float_results[name]["top1"]
    numbers[f"quantized_zero_shot/{name}/top1"] = quant_results[name]["top1"]
    numbers[f"zero_shot/{name}/count"] = quant_results[name]["count"]
  return {**numbers, **_sizes(trained.variables, qvariables, out)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from vit_jax import quantization  # pylint: disable=g-import-not-at-top
  settings = quantization.Settings(mode=FLAGS.mode, targets=FLAGS.targets,
                                   exclude=FLAGS.exclude)
  print(json.dumps(quantize_workdir(FLAGS.workdir, settings, FLAGS.out, FLAGS.step,
                                    FLAGS.calibration_batches)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
