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

The exit heads' train state is checkpointed (``checkpoint_every``) under
``<workdir>/early_exit/checkpoints`` (``--config.output_dir`` moves it and
``results.json``); the same command rerun after a kill resumes there exactly (``train``).

Measured (README, "Early exits"; configs/digits_early_exit.py): on the 4-block digits
ViT fine-tuned after MAE (93.33%), exits after blocks 0, 1, 2 and threshold 0.72 keep
92.50% top-1 at 33% fewer GFLOPs per image.
"""

import functools
import json
from typing import Any, Callable, NamedTuple

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


class ExitRun(NamedTuple):
  """A classification workdir's frozen ViT and the exit heads to train on it."""
  workdir: str
  config: dict  # the workdir's config.json
  builder: Any  # its dataset
  settings: dict  # models.create's
  exits: tuple
  heads: Any  # early_exit.ExitHeads
  backbone: Callable  # images -> ({exit: block tokens}, final logits)


def load(workdir: str, exit_layers, data_dir=None) -> ExitRun:
  from vit_jax import models, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
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
  return ExitRun(str(workdir), config, builder, settings, exits, heads, backbone)


def train(exit_run: ExitRun, *, steps: int, batch_size: int, learning_rate: float,
          seed: int = 0, output_dir=None, checkpoint_every: int = 0,
          keep_checkpoints: int = 3):
  """The exit heads' params after ``steps`` steps of self-distillation.

  Their train state (params, Adam state, step) is saved every ``checkpoint_every``
  steps (0: at the end only) and at the end, under
  ``<output_dir or workdir>/early_exit/checkpoints``; a rerun resumes from the newest
  step that verifies, its input restarting at the example it had reached (as the
  classification trainer's), so a killed run ends bit-identical to an uninterrupted one.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.models import early_exit  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import common  # pylint: disable=g-import-not-at-top

  data, backbone, heads = exit_run.config["input"], exit_run.backbone, exit_run.heads
  # What the checkpoints record, so that a resume names the settings changed since.
  run_config = ml_collections.ConfigDict(dict(
      workdir=exit_run.workdir, exit_layers=list(exit_run.exits), steps=steps,
      batch_size=batch_size, learning_rate=learning_rate, seed=seed,
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints))
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  # The heads' parameter shapes depend on the token width only: one eval image's
  # shape (pp_train's random ops need the training stream's seeds) will do.
  image = jax.ShapeDtypeStruct((1, *model_input_shape(
      exit_run.builder, data["eval_split"], data["pp_eval"])), jnp.float32)
  token_shapes = jax.eval_shape(backbone, image)[0]
  init_state = common.init_state_fn(lambda key: heads.init(key, jax.tree.map(
      lambda t: jnp.zeros(t.shape, t.dtype), token_shapes)), tx)
  init_key = jax.random.key(seed)
  abstract_state = jax.eval_shape(init_state, init_key)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpointer, state, restored = common.restore_or_init(
      run_config, epath.Path(output_dir or exit_run.workdir) / "early_exit", init_state,
      init_key, abstract_state, jax.tree.map(lambda _: device, abstract_state))
  start_step = int(state.step)
  examples_seen = 0
  if restored is not None:
    examples_seen = restored.meta["examples_seen"]
    common.console(f"exit heads: resumed from {checkpointer.directory / str(start_step)}")

  train_ds = input_pipeline.make_train_dataset(
      exit_run.builder, data["train_split"],
      preprocess_fn=preprocess.parse(data["pp_train"]), batch_size=batch_size, seed=seed,
      start_position=examples_seen, shuffle_buffer=data.get("shuffle_buffer", 1000))
  batches = input_pipeline.numpy_batches(train_ds)

  @jax.jit
  def train_step(state, images, labels):
    tokens, final = backbone(images)  # frozen: no gradient reaches the backbone
    loss, grads = jax.value_and_grad(functools.partial(early_exit.exit_loss, heads))(
        state.params, tokens, final, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, opt_state=opt_state,
                         params=optax.apply_updates(state.params, updates)), loss

  guard = common.NonFiniteGuard()
  for i in range(start_step + 1, steps + 1):
    batch = next(batches)
    state, loss = train_step(state, batch["image"], batch["label"])
    examples_seen += batch_size
    guard.add(i, jnp.isfinite(loss))
    log = i % 100 == 0 or i in (start_step + 1, steps)  # the first: compiled, running
    save = bool(checkpoint_every and i % checkpoint_every == 0) or i == steps
    if log or save:
      guard.check(checkpointer.newest_committed)  # a diverged state is never saved
    if log:
      common.console(f"exit heads step {i}/{steps}: loss {float(loss):.4f}")
    if save:
      checkpointer.save(i, state, {"step": i, "examples_seen": examples_seen})
  checkpointer.close()
  return state.params


def run(workdir: str, exit_layers, *, steps: int, batch_size: int, learning_rate: float,
        thresholds, data_dir=None, seed: int = 0, output_dir=None,
        checkpoint_every: int = 0, keep_checkpoints: int = 3) -> dict:
  """Trains the exits of ``workdir``'s ViT (``train``: checkpointed, resumable); returns
  the curve and the exit costs, also written to ``<output_dir or
  workdir>/early_exit/results.json``."""
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.models import early_exit  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import common  # pylint: disable=g-import-not-at-top

  exit_run = load(workdir, exit_layers, data_dir)
  params = train(exit_run, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                 seed=seed, output_dir=output_dir, checkpoint_every=checkpoint_every,
                 keep_checkpoints=keep_checkpoints)
  data, exits, settings = exit_run.config["input"], exit_run.exits, exit_run.settings

  @jax.jit
  def all_probs(images):
    tokens, final = exit_run.backbone(images)
    logits = jnp.concatenate([exit_run.heads.apply({"params": params}, tokens),
                              final[None]])
    return jax.nn.softmax(logits, axis=-1)

  eval_ds, _ = input_pipeline.make_eval_dataset(
      exit_run.builder, data["eval_split"], preprocess_fn=preprocess.parse(data["pp_eval"]),
      batch_size=data.get("eval_batch_size") or 256)
  probs, labels = [], []
  for b in input_pipeline.numpy_batches(eval_ds):
    keep = b["_mask"]
    probs.append(np.asarray(all_probs(b["image"]))[:, keep])
    labels.append(b["label"][keep])
  probs, labels = np.concatenate(probs, axis=1), np.concatenate(labels)
  gflops = early_exit.exit_gflops(exit_run.config["model_name"], exits, **settings)
  curve = [{**row, "exit_share": [float(x) for x in row["exit_share"]]} for row in
           early_exit.threshold_curve(probs, labels, gflops, [float(t) for t in thresholds])]
  result = {"exit_layers": exits, "gflops": gflops, "curve": curve,
            "exit_accuracy": [float(np.mean(p.argmax(-1) == labels)) for p in probs]}
  common.write_json(epath.Path(output_dir or workdir) / "early_exit" / "results.json",
                    result)
  return result


def model_input_shape(builder, split: str, pp: str) -> tuple[int, ...]:
  """The shape of one image of ``split`` after ``pp``."""
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  ds, _ = input_pipeline.make_eval_dataset(
      builder, split, preprocess_fn=preprocess.parse(pp), batch_size=1, cache=False)
  return next(input_pipeline.numpy_batches(ds))["image"].shape[1:]


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
               thresholds=config.thresholds, data_dir=config.data_dir, seed=config.seed,
               output_dir=config.output_dir, checkpoint_every=config.checkpoint_every,
               keep_checkpoints=config.keep_checkpoints)
  accs = ", ".join(f"{100 * a:.2f}%" for a in result["exit_accuracy"])
  print(f"each exit alone (then the final head): {accs}")
  print(markdown(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "config"])
  app.run(main)
