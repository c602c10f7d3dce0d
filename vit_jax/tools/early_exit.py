r"""Early exits on a trained classification workdir, LGViT's two-stage recipe: exit
heads after chosen blocks (plain, local-perception or global-aggregation), stage 1
trains backbone and exits end to end, stage 2 self-distils the final head into the
exits with the backbone frozen; then accuracy and mean GFLOPs per image at each
confidence threshold (``vit_jax.evaluators.early_exit``).

  python -m vit_jax.tools.early_exit --config=configs/digits_early_exit.py \
      --workdir=workdirs/ft_mae
  python -m vit_jax.tools.early_exit --config=configs/digits_early_exit.py:plain \
      --workdir=workdirs/ft_mae  # plain heads, stage 2 only

Stage 1 (``stage1_steps``; 0 skips it) minimises the final head's cross-entropy plus
the exits' weighted ones (``early_exit.stage1_loss``); stage 2 (``steps``) trains the
exits alone on the final head's soft predictions (``losses.distillation_loss``, soft,
tau 1) plus the labels (``early_exit.exit_loss``). Both use the workdir's own
training data and ``pp_train``; the workdir's checkpoint is never written. The curve
uses the run's ``eval_split``; a threshold above 1 is the full model. An exit's cost
is the truncated model's plus that of every exit head run so far.

Each stage's train state is checkpointed (``checkpoint_every``) under
``<workdir>/early_exit/stage1/checkpoints`` and ``<workdir>/early_exit/checkpoints``
(``--config.output_dir`` moves them and ``results.json``); the same command rerun
after a kill resumes there exactly (``train``).

Measured: README, "Early exits" (configs/digits_early_exit.py has the numbers).
"""

import json
from typing import Any, Callable, NamedTuple

from absl import app, flags
from etils import epath
import jax
import jax.numpy as jnp
import optax
from ml_collections import config_flags

FLAGS = flags.FLAGS


class ExitRun(NamedTuple):
  """A classification workdir's ViT and the exit heads to train on it."""
  workdir: str
  config: dict  # the workdir's config.json
  builder: Any  # its dataset
  settings: dict  # models.create's
  exits: tuple
  heads: Any  # early_exit.ExitHeads
  variables: dict  # the workdir's trained ViT
  backbone: Callable  # (backbone params, images) -> ({exit: block tokens}, final logits)
  # Token shapes and compiled steps, by their settings: a second ``train`` with the
  # same settings in one process (a resume in tests or a notebook) compiles nothing.
  cache: dict


def load(workdir: str, exit_layers, data_dir=None, exit_heads=None) -> ExitRun:
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
  kinds = early_exit.check_exit_heads(exit_heads, exits)
  variables, _ = workdir_lib.read_variables(workdir)
  heads = early_exit.ExitHeads(exits, num_classes, pool="gap" if model.classifier == "gap"
                               else "token", kinds=kinds, num_heads=model.num_heads)

  def backbone(params, images):
    logits, inter = models.forward_intermediates(model, {**variables, "params": params},
                                                 images)
    return early_exit.block_tokens(inter, exits), logits
  return ExitRun(str(workdir), config, builder, settings, exits, heads, dict(variables),
                 backbone, {})


def _token_shapes(exit_run: ExitRun) -> dict:
  # The heads' parameter shapes depend on the token shapes only: one eval image's
  # shape (pp_train's random ops need the training stream's seeds) will do.
  if "tokens" not in exit_run.cache:
    data = exit_run.config["input"]
    image = jax.ShapeDtypeStruct((1, *model_input_shape(
        exit_run.builder, data["eval_split"], data["pp_eval"])), jnp.float32)
    exit_run.cache["tokens"] = jax.eval_shape(exit_run.backbone,
                                              exit_run.variables["params"], image)[0]
  return exit_run.cache["tokens"]


def _step(exit_run: ExitRun, stage: int, steps: int, learning_rate: float,
          backbone_learning_rate: float, weights: tuple):
  """``(tx, jitted train step)`` of a stage."""
  from vit_jax.models import early_exit  # pylint: disable=g-import-not-at-top
  backbone, heads = exit_run.backbone, exit_run.heads
  if stage == 1:
    tx = optax.multi_transform(
        {"backbone": optax.adam(optax.cosine_decay_schedule(backbone_learning_rate, steps)),
         "exits": optax.adam(optax.cosine_decay_schedule(learning_rate, steps))},
        {"backbone": "backbone", "exits": "exits"})
  else:
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def stage1_loss(params, frozen, images, labels):
    del frozen
    tokens, final = backbone(params["backbone"], images)
    exit_logits = heads.apply({"params": params["exits"]}, tokens)
    return early_exit.stage1_loss(exit_logits, final, labels, weights)

  def stage2_loss(params, frozen, images, labels):
    tokens, final = backbone(frozen, images)  # frozen: its params get no gradient
    return early_exit.exit_loss(heads, params, tokens, final, labels)

  @jax.jit
  def train_step(state, frozen, images, labels):
    loss, grads = jax.value_and_grad(stage1_loss if stage == 1 else stage2_loss)(
        state.params, frozen, images, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, opt_state=opt_state,
                         params=optax.apply_updates(state.params, updates)), loss
  return tx, train_step


def train(exit_run: ExitRun, *, steps: int, batch_size: int, learning_rate: float,
          stage: int = 2, backbone_params=None, head_params=None,
          backbone_learning_rate: float = 1e-4, exit_weights=None, seed: int = 0,
          output_dir=None, checkpoint_every: int = 0, keep_checkpoints: int = 3):
  """One stage of LGViT's recipe; returns the trained params after ``steps`` steps.

  Stage 1 trains the backbone (from ``backbone_params``, default the workdir's) and
  the exits end to end on ``early_exit.stage1_loss`` (``exit_weights``: one per exit,
  default 1), Adam at ``backbone_learning_rate`` and ``learning_rate``; it returns
  ``{"backbone": ..., "exits": ...}``. Stage 2 trains the exits alone (from
  ``head_params``, default fresh) by self-distillation from the final head of the
  frozen ``backbone_params`` (``early_exit.exit_loss``); it returns their params.
  The backbone runs deterministically (``train=False``: no dropout or DropPath).

  The train state (params, Adam state, step) is saved every ``checkpoint_every``
  steps (0: at the end only) and at the end, under
  ``<output_dir or workdir>/early_exit/checkpoints`` (stage 2) or
  ``.../early_exit/stage1/checkpoints``; a rerun resumes from the newest step that
  verifies, its input restarting at the example it had reached (as the classification
  trainer's), so a killed run ends bit-identical to an uninterrupted one.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import common  # pylint: disable=g-import-not-at-top

  if stage not in (1, 2):
    raise ValueError(f"stage must be 1 or 2, got {stage}")
  data, heads = exit_run.config["input"], exit_run.heads
  backbone_params = (exit_run.variables["params"] if backbone_params is None
                     else backbone_params)
  weights = tuple(float(w) for w in (exit_weights or [1.0] * len(exit_run.exits)))
  if len(weights) != len(exit_run.exits):
    raise ValueError(f"exit_weights={list(weights)}: need one per exit "
                     f"(exit_layers={list(exit_run.exits)})")
  # What the checkpoints record, so that a resume names the settings changed since.
  run_config = ml_collections.ConfigDict(dict(
      workdir=exit_run.workdir, exit_layers=list(exit_run.exits),
      exit_heads=list(exit_run.heads.kinds), stage=stage, steps=steps,
      batch_size=batch_size, learning_rate=learning_rate, seed=seed,
      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints))
  if stage == 1:
    run_config.backbone_learning_rate = backbone_learning_rate
    run_config.exit_weights = list(weights)
  key = ("step", stage, steps, learning_rate, backbone_learning_rate, weights)
  if key not in exit_run.cache:
    exit_run.cache[key] = _step(exit_run, stage, steps, learning_rate,
                                backbone_learning_rate, weights)
  tx, train_step = exit_run.cache[key]
  token_shapes = _token_shapes(exit_run)

  def init_variables(key):
    exits = head_params if head_params is not None else heads.init(key, jax.tree.map(
        lambda t: jnp.zeros(t.shape, t.dtype), token_shapes))["params"]
    return {"params": {"backbone": backbone_params, "exits": exits} if stage == 1
            else exits}
  init_state = common.init_state_fn(init_variables, tx)
  init_key = jax.random.key(seed)
  abstract_state = jax.eval_shape(init_state, init_key)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  directory = epath.Path(output_dir or exit_run.workdir) / "early_exit"
  checkpointer, state, restored = common.restore_or_init(
      run_config, directory / "stage1" if stage == 1 else directory, init_state,
      init_key, abstract_state, jax.tree.map(lambda _: device, abstract_state))
  start_step = int(state.step)
  examples_seen = 0
  if restored is not None:
    examples_seen = restored.meta["examples_seen"]
    common.console(f"exit heads (stage {stage}): resumed from "
                   f"{checkpointer.directory / str(start_step)}")

  train_ds = input_pipeline.make_train_dataset(
      exit_run.builder, data["train_split"],
      preprocess_fn=preprocess.parse(data["pp_train"]), batch_size=batch_size, seed=seed,
      start_position=examples_seen, shuffle_buffer=data.get("shuffle_buffer", 1000))
  batches = input_pipeline.numpy_batches(train_ds)

  frozen = None if stage == 1 else backbone_params
  guard = common.NonFiniteGuard()
  for i in range(start_step + 1, steps + 1):
    batch = next(batches)
    state, loss = train_step(state, frozen, batch["image"], batch["label"])
    examples_seen += batch_size
    guard.add(i, jnp.isfinite(loss))
    log = i % 100 == 0 or i in (start_step + 1, steps)  # the first: compiled, running
    save = bool(checkpoint_every and i % checkpoint_every == 0) or i == steps
    if log or save:
      guard.check(checkpointer.newest_committed)  # a diverged state is never saved
    if log:
      common.console(f"exit heads stage {stage} step {i}/{steps}: loss {float(loss):.4f}")
    if save:
      checkpointer.save(i, state, {"step": i, "examples_seen": examples_seen})
  checkpointer.close()
  return state.params


def evaluate(exit_run: ExitRun, backbone_params, head_params, thresholds,
             output_dir=None) -> dict:
  """The curve of ``vit_jax.evaluators.early_exit`` on the run's ``eval_split``, with
  the exits' costs (``early_exit.exit_gflops``, heads included)."""
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import early_exit as evaluator  # pylint: disable=g-import-not-at-top
  from vit_jax.models import early_exit  # pylint: disable=g-import-not-at-top

  data, exits, heads = exit_run.config["input"], exit_run.exits, exit_run.heads
  heads_gflops = early_exit.head_gflops(heads, _token_shapes(exit_run))
  gflops = early_exit.exit_gflops(exit_run.config["model_name"], exits, heads_gflops,
                                  **exit_run.settings)

  def predict(variables, images):
    tokens, final = exit_run.backbone(variables["backbone"], images)
    return jnp.concatenate([heads.apply({"params": variables["exits"]}, tokens),
                            final[None]])

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  result = evaluator.EarlyExitEvaluator(
      predict, exit_run.builder, data["eval_split"],
      preprocess_fn=preprocess.parse(data["pp_eval"]),
      batch_size=data.get("eval_batch_size") or 256, sharding=device, gflops=gflops,
      thresholds=thresholds).run({"backbone": backbone_params, "exits": head_params})
  # The ViT without exits: what "saved" compares with (exit heads are overhead).
  return {"exit_layers": list(exits), "exit_heads": list(heads.kinds),
          "heads_gflops": heads_gflops, "model_gflops": gflops[-1] - sum(heads_gflops),
          **result}


def run(workdir: str, exit_layers, *, steps: int, batch_size: int, learning_rate: float,
        thresholds, exit_heads=None, stage1_steps: int = 0,
        backbone_learning_rate: float = 1e-4, exit_weights=None, data_dir=None,
        seed: int = 0, output_dir=None, checkpoint_every: int = 0,
        keep_checkpoints: int = 3) -> dict:
  """LGViT's recipe on ``workdir``'s ViT: stage 1 (``stage1_steps``, 0 skips it), then
  stage 2 (``steps``), each checkpointed and resumable (``train``); returns the curve
  and the exit costs, also written to ``<output_dir or workdir>/early_exit/results.json``."""
  from vit_jax.trainers import common  # pylint: disable=g-import-not-at-top

  exit_run = load(workdir, exit_layers, data_dir, exit_heads)
  common_args = dict(batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                     output_dir=output_dir, checkpoint_every=checkpoint_every,
                     keep_checkpoints=keep_checkpoints)
  backbone_params, head_params = exit_run.variables["params"], None
  if stage1_steps:
    stage1 = train(exit_run, stage=1, steps=stage1_steps,
                   backbone_learning_rate=backbone_learning_rate,
                   exit_weights=exit_weights, **common_args)
    backbone_params, head_params = stage1["backbone"], stage1["exits"]
  head_params = train(exit_run, stage=2, steps=steps, backbone_params=backbone_params,
                      head_params=head_params, **common_args)
  result = evaluate(exit_run, backbone_params, head_params,
                    [float(t) for t in thresholds])
  result["stage1_steps"], result["stage2_steps"] = stage1_steps, steps
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
  lines = ["| threshold | top-1 | GFLOPs/image | saved vs the ViT | images leaving at "
           + ", ".join(names) + " |", "|---|---|---|---|---|"]
  full = result["model_gflops"]  # the ViT alone, no exit heads
  for row in result["curve"]:
    share = " / ".join(f"{100 * s:.0f}%" for s in row["exit_share"])
    saved = round(100 * (1 - row["gflops"] / full))  # an int: no "-0%"
    lines.append(f"| {row['threshold']:.2f} | {100 * row['accuracy']:.2f}% | "
                 f"{row['gflops'] * 1e3:.3f}e-3 | {saved:.0f}% | {share} |")
  return "\n".join(lines)


def define_flags() -> None:
  """The command's flags, defined when it runs: the tests import this module beside
  the trainer, whose --workdir and --config it would otherwise claim."""
  flags.DEFINE_string("workdir", None, "A classification trainer's workdir (a ViT).")
  config_flags.DEFINE_config_file(
      "config", None, "The exits and their training: configs/digits_early_exit.py; "
      "--config.FIELD=V overrides a field.")
  flags.mark_flags_as_required(["workdir", "config"])


def main(argv):
  del argv
  config = FLAGS.config
  result = run(FLAGS.workdir, config.exit_layers, steps=config.steps,
               batch_size=config.batch_size, learning_rate=config.learning_rate,
               thresholds=config.thresholds, exit_heads=config.exit_heads,
               stage1_steps=config.stage1_steps,
               backbone_learning_rate=config.backbone_learning_rate,
               exit_weights=config.exit_weights, data_dir=config.data_dir, seed=config.seed,
               output_dir=config.output_dir, checkpoint_every=config.checkpoint_every,
               keep_checkpoints=config.keep_checkpoints)
  accs = ", ".join(f"{100 * a:.2f}%" for a in result["exit_accuracy"])
  print(f"each exit alone (then the final head): {accs}")
  print(markdown(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
