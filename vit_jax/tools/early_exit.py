r"""Early exits on a trained classification workdir: train the exit heads by
self-distillation (the backbone frozen), then report accuracy and mean GFLOPs per
image at each confidence threshold.

  python -m vit_jax.tools.early_exit --config=configs/digits_early_exit.py \
      --workdir=workdirs/ft_digits --config.steps=300

Stage 2 of LGViT's recipe: each exit learns the final head's soft predictions
(``losses.distillation_loss``, soft, tau 1) plus the labels (``early_exit.exit_loss``),
on the workdir's own training data and ``pp_train``; the backbone's parameters are not
updated. The curve uses the run's ``eval_split``; a threshold above 1 is the full model.
See ``vit_jax.models.early_exit`` for the exit rule and the cost model.

Measured (README, "Early exits"; configs/digits_early_exit.py): on the 4-block digits
ViT fine-tuned after MAE (93.33%), exits after blocks 0, 1, 2 and threshold 0.72 keep
92.50% top-1 at 33% fewer GFLOPs per image.
"""

import functools
import json

from absl import app, flags
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A classification trainer's workdir (a ViT).")
config_flags.DEFINE_config_file(
    "config", None, "The exits and their training: configs/digits_early_exit.py; "
    "--config.FIELD=V overrides a field.")


def run(workdir: str, exit_layers, *, steps: int, batch_size: int, learning_rate: float,
        thresholds, data_dir=None, seed: int = 0) -> dict:
  """Trains the exits of ``workdir``'s ViT; returns the curve and the exit costs."""
  from vit_jax import models, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.models import early_exit  # pylint: disable=g-import-not-at-top

  config = json.loads((epath.Path(workdir) / "config.json").read_text())
  if config.get("trainer") != "classification":
    raise ValueError(f"{workdir} is not a classification run")
  data = config["input"]
  builder = input_pipeline.get_builder(data["dataset"], data_dir or data.get("data_dir"))
  num_classes = builder.info.features["label"].num_classes
  settings = {"num_classes": num_classes, **config["model"]}
  model = models.create(config["model_name"], **settings)
  exits = early_exit.check_exit_layers(exit_layers, model.num_layers)
  variables, _ = workdir_lib.read_variables(workdir)
  heads = early_exit.ExitHeads(exits, num_classes, pool="gap" if model.classifier == "gap"
                               else "token")

  def backbone(images):
    logits, inter = models.forward_intermediates(model, variables, images)
    return early_exit.block_tokens(inter, exits), logits

  train_ds = input_pipeline.make_train_dataset(
      builder, data["train_split"], preprocess_fn=preprocess.parse(data["pp_train"]),
      batch_size=batch_size, seed=seed, shuffle_buffer=data.get("shuffle_buffer", 1000))
  batches = input_pipeline.numpy_batches(train_ds)
  first = next(batches)
  tokens, _ = jax.jit(backbone)(first["image"][:1])
  params = heads.init(jax.random.key(seed), tokens)["params"]
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    tokens, final = backbone(images)  # frozen: no gradient reaches the backbone

    loss, grads = jax.value_and_grad(functools.partial(early_exit.exit_loss, heads))(
        params, tokens, final, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = first
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
    if (i + 1) % 100 == 0 or i + 1 == steps:
      print(f"exit heads step {i + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    batch = next(batches)

  @jax.jit
  def all_probs(images):
    tokens, final = backbone(images)
    logits = jnp.concatenate([heads.apply({"params": params}, tokens), final[None]])
    return jax.nn.softmax(logits, axis=-1)

  eval_ds, _ = input_pipeline.make_eval_dataset(
      builder, data["eval_split"], preprocess_fn=preprocess.parse(data["pp_eval"]),
      batch_size=data.get("eval_batch_size") or 256)
  probs, labels = [], []
  for b in input_pipeline.numpy_batches(eval_ds):
    keep = b["_mask"]
    probs.append(np.asarray(all_probs(b["image"]))[:, keep])
    labels.append(b["label"][keep])
  probs, labels = np.concatenate(probs, axis=1), np.concatenate(labels)
  gflops = early_exit.exit_gflops(config["model_name"], exits, **settings)
  curve = early_exit.threshold_curve(probs, labels, gflops, [float(t) for t in thresholds])
  return {"exit_layers": exits, "gflops": gflops, "curve": curve,
          "exit_accuracy": [float(np.mean(p.argmax(-1) == labels)) for p in probs]}


def markdown(result: dict) -> str:
  names = [f"exit {i}" for i in result["exit_layers"]] + ["final"]
  lines = ["| threshold | top-1 | GFLOPs/image | saved | images leaving at "
           + ", ".join(names) + " |", "|---|---|---|---|---|"]
  full = result["gflops"][-1]
  for row in result["curve"]:
    share = " / ".join(f"{100 * s:.0f}%" for s in row["exit_share"])
    saved = 100 * (1 - row["gflops"] / full)
    lines.append(f"| {row['threshold']:.2f} | {100 * row['accuracy']:.2f}% | "
                 f"{row['gflops'] * 1e3:.3f}e-3 | {saved:.0f}% | {share} |")
  return "\n".join(lines)


def main(argv):
  del argv
  config = FLAGS.config
  result = run(FLAGS.workdir, config.exit_layers, steps=config.steps,
               batch_size=config.batch_size, learning_rate=config.learning_rate,
               thresholds=config.thresholds, data_dir=config.data_dir, seed=config.seed)
  accs = ", ".join(f"{100 * a:.2f}%" for a in result["exit_accuracy"])
  print(f"each exit alone (then the final head): {accs}")
  print(markdown(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "config"])
  app.run(main)
