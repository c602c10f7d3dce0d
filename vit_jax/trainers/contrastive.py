"""Contrastive image-text pretraining (CLIP, SigLIP) on webdataset-style ``.tar`` shards.

Read top to bottom: setup, mesh, data (shards, tokenizer, stream), model and
optimizer, train state and its sharding, checkpoint restore, step function,
evaluators (zero-shot classification, retrieval), loop. One process per host runs
this same code; each reads its own shards and feeds its slice of the global batch.

The loss sees the whole global batch: InfoNCE gathers the embeddings from every
device, SigLIP passes the text embeddings around the device ring (``losses.py``).
Gradient accumulation is not offered: microbatches would change the negatives, and
so the loss.
"""

import json
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from vit_jax import checkpoint as ckpt_lib
from vit_jax import config_checks, losses, models, optim, quantization, sharding
from vit_jax.data import image_text, preprocess
from vit_jax.data.tokenizer import Tokenizer
from vit_jax.evaluators import retrieval as retrieval_eval
from vit_jax.evaluators import zero_shot as zero_shot_eval
from vit_jax.trainers import common
from vit_jax.trainers.common import TrainState
from vit_jax.workdir import MODEL_FILE, TOKENIZER_FILE


def model_settings(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> dict:
  """The model's overrides, with the text tower sized for the tokenizer.

  The vocabulary, context length and special-token ids come from the tokenizer; a
  config that sets them differently is an error rather than a silent mismatch.
  """
  settings = config.model.to_dict()
  text = dict(settings.get("text") or {})
  derived = {"vocab_size": tokenizer.vocab_size,
             "context_length": tokenizer.context_length,
             "pad_id": tokenizer.pad_id}
  if text.get("pool", "eot") == "eot":
    derived["eot_id"] = tokenizer.eot_id
  for key, value in derived.items():
    if key in text and text[key] != value:
      raise ValueError(f"config.model.text.{key}={text[key]} but the tokenizer gives "
                       f"{value}; remove the setting or use a matching tokenizer")
  settings["text"] = {**text, **derived}
  if config.loss == "siglip" and settings.get("logit_bias_init") is None:
    raise ValueError("the siglip loss needs config.model.logit_bias_init (SigLIP: -10) "
                     "and usually logit_scale_init=log(10)")
  return settings


def _gather_positions(position: image_text.StreamPosition) -> list[list[int]]:
  """Every process's stream position (for the checkpoint), in process order."""
  local = np.asarray(position.to_list(), np.int64)
  if jax.process_count() == 1:
    return [local.tolist()]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(local)).tolist()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model_name`` on ``config.input.train_shards``.

  Returns the final metrics (also in ``workdir/results.json``) and, under
  ``train_loss_history``, the (step, mean loss) pairs of this run's log lines.
  """
  # ---------------------------------------------------------------- setup
  config_checks.validate(config)
  workdir = ckpt_lib.absolute(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = common.make_writer(workdir / "tensorboard", config)
  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  data_parallel = sharding.data_parallel_size(mesh)

  # ---------------------------------------------------------------- data
  shards = image_text.expand_shards(config.input.train_shards)
  tokenizer = Tokenizer.load(config.tokenizer.path,
                             context_length=config.tokenizer.context_length)
  global_batch = config.input.batch_size
  if global_batch % data_parallel:
    raise ValueError(f"input.batch_size={global_batch} must be divisible by the "
                     f"data-parallel devices ({data_parallel})")
  if global_batch % jax.process_count():
    raise ValueError(f"input.batch_size={global_batch} must be divisible by the "
                     f"{jax.process_count()} processes")
  local_batch = global_batch // jax.process_count()
  total_steps = config.total_steps
  if config.get("total_samples"):  # DataComp specifies samples seen
    total_steps = math.ceil(config.total_samples / global_batch)
  if not total_steps or total_steps <= 0:
    raise ValueError("set config.total_steps or config.total_samples to a positive number")
  pp_train = preprocess.parse(config.input.pp_train)

  # ---------------------------------------------------------------- model and optimizer
  model_kwargs = model_settings(config, tokenizer)
  model = models.create(config.model_name, **model_kwargs)
  if not hasattr(model, "logit_scale_init"):
    raise ValueError(f"{config.model_name!r} is not a two-tower model; use one of "
                     f"{', '.join(models.list_models(family='two_tower'))}")
  # QAT: fake-quantized dots in both towers, or those config.quantization.targets
  # matches (e.g. "img/.*" for the image tower); parameters stay float.
  model = quantization.from_config(model, config.get("quantization"), check_inputs=())
  schedule = optim.learning_rate_schedule(
      config.optimizer.learning_rate, total_steps,
      warmup_steps=config.schedule.warmup_steps, decay=config.schedule.decay,
      end_factor=config.schedule.end_factor)

  def init_variables(key):
    return model.init({"params": key, "dropout": key}, train=False)

  abstract_params = jax.eval_shape(init_variables, init_key)["params"]
  tx = optim.make_optimizer(config.optimizer, schedule, abstract_params)
  max_logit_scale = math.log(config.max_logit_scale)

  # ---------------------------------------------------------------- train state, sharded
  init_state = common.init_state_fn(init_variables, tx)
  abstract_state = jax.eval_shape(init_state, init_key)
  # Parameters and optimizer state by config.sharding's rules, as in classification.
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.get("sharding"))
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  common.console(f"model {config.model_name} ({config.loss} loss): {num_params:,} "
                 f"parameters; mesh {dict(mesh.shape)}; {total_steps} steps of "
                 f"{global_batch} pairs from {len(shards)} shards")

  # ---------------------------------------------------------------- checkpoint restore
  checkpointer, state, restored = common.restore_or_init(
      config, workdir, init_state, init_key, abstract_state, state_shardings)
  position = image_text.StreamPosition()
  if restored is not None:
    meta = restored.meta
    examples_seen = meta["examples_seen"]
    positions = meta["data_positions"]
    if len(positions) != jax.process_count():
      raise ckpt_lib.CheckpointError(
          f"the checkpoint was written by {len(positions)} processes; resume with the "
          f"same number (now {jax.process_count()}) to continue the data stream exactly")
    position = image_text.StreamPosition.from_list(positions[jax.process_index()])
    common.console(f"resumed from {checkpointer.directory / str(restored.step)} "
                   f"(step {restored.step}, "
                   f"data position epoch {position.epoch} window {position.window} "
                   f"sample {position.offset})")
  else:
    examples_seen = 0
  start_step = int(state.step)
  # Only now that the checkpoint is known to fit: the workdir describes what it holds
  # (config, model and tokenizer: enough to rebuild the model, see workdir.py).
  common.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  common.write_json(workdir / MODEL_FILE, {
      "model_name": config.model_name, "model": model_kwargs, "loss": config.loss,
      "context_length": tokenizer.context_length, "pp_eval": config.input.pp_eval})
  if common.is_main_process() and not (workdir / TOKENIZER_FILE).exists():
    epath.Path(config.tokenizer.path).copy(workdir / TOKENIZER_FILE)

  # ---------------------------------------------------------------- step function
  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(dropout_key, state.step)
    mutable = list(state.model_state) or False

    def loss_fn(params):
      out = model.apply({"params": params, **state.model_state},
                        image_text.model_images(batch), batch["text"], train=True, rngs={"dropout": rng}, mutable=mutable)
      (zimg, ztxt, extras), model_state = out if mutable else (out, state.model_state)
      loss, metrics = losses.contrastive_loss(
          config.loss, zimg, ztxt, extras["logit_scale"], extras.get("logit_bias"),
          mesh=mesh, chunk_size=config.get("siglip_chunk_size"))
      return loss, (metrics, model_state)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # CLIP's clamp: the temperature may not sharpen logits beyond max_logit_scale.
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, max_logit_scale)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
               "logit_scale": jnp.exp(params["logit_scale"]),
               "learning_rate": schedule(state.step),
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    if "logit_bias" in params:
      metrics["logit_bias"] = params["logit_bias"]
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  train_step = jax.jit(train_step, donate_argnums=0,
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))

  # ---------------------------------------------------------------- evaluators
  eval_batch = config.input.get("eval_batch_size") or global_batch
  evaluators = {}
  for name, entry in (config.evals.get("zero_shot") or {}).items():
    if entry.get("classnames") is None:
      common.console(f"zero-shot eval {name!r} skipped: set "
                     f"--config.evals.zero_shot.{name}.classnames=FILE")
      continue
    evaluators[f"zero_shot/{name}"] = zero_shot_eval.from_config(
        entry, model, tokenizer, sharding=batch_sharding, batch_size=eval_batch)
  for name, entry in (config.evals.get("retrieval") or {}).items():
    if entry.get("shards") is None:
      common.console(f"retrieval eval {name!r} skipped: set "
                     f"--config.evals.retrieval.{name}.shards=SHARDS")
      continue
    evaluators[f"retrieval/{name}"] = retrieval_eval.from_config(
        entry, model, tokenizer, sharding=batch_sharding, batch_size=eval_batch)

  def evaluate(step: int) -> dict:
    results = {}
    variables = {"params": state.params, **state.model_state}
    for name, evaluator in evaluators.items():
      started = time.perf_counter()
      result = evaluator.run(variables)
      writer.write_scalars(step, {f"eval/{name}/{k}": v for k, v in result.items()})
      shown = " | ".join(f"{k} {100 * v:.2f}%" for k, v in result.items() if k != "count")
      common.console(f"eval {name} at step {step}: {shown} ({result['count']} examples, "
                     f"{time.perf_counter() - started:.1f}s)")
      results.update({f"{name}/{k}": v for k, v in result.items()})
    return results

  def save(step: int) -> None:
    checkpointer.save(step, state, {"step": step, "examples_seen": examples_seen,
                                    "data_positions": _gather_positions(position),
                                    "model_name": config.model_name,
                                    "model": model_kwargs})

  # ---------------------------------------------------------------- loop
  skip_stats = image_text.SkipStats()
  stream = image_text.ImageTextStream(
      shards, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), shards_per_window=config.input.shards_per_window,
      window_bytes=config.input.get("window_bytes", image_text.WINDOW_BYTES),
      position=position, stats=skip_stats)
  train_data = image_text.TrainData(stream, tokenizer=tokenizer, preprocess_fn=pp_train,
                                    batch_size=local_batch,
                                    threads=config.input.get("threads"))
  batches = image_text.device_batches(train_data, batch_sharding)
  key_log = None
  if config.input.get("record_keys"):
    # Which samples each step consumed, per process: exact samples-seen accounting.
    # Lines of steps after the restored checkpoint were never saved: drop them.
    key_log_path = workdir / f"samples_process{jax.process_index()}.txt"
    kept = []
    if key_log_path.exists():
      kept = [line for line in key_log_path.read_text().splitlines()
              if int(line.split(" ", 1)[0]) <= start_step]
    key_log_path.write_text("".join(line + "\n" for line in kept))
    key_log = key_log_path.open("a")
  progress = common.ProgressLine(total_steps, start_step, global_batch)
  guard = common.NonFiniteGuard()
  pending = []
  eval_result = None
  reported_skips = 0
  loss_history = []

  with jax.set_mesh(mesh):
    if start_step < total_steps:
      common.console(f"compiling the train step (first step {start_step + 1})...")
    for step in range(start_step + 1, total_steps + 1):
      device_batch, host_batch = next(batches)
      state, metrics = train_step(state, device_batch)
      examples_seen += global_batch
      position = image_text.StreamPosition.from_list(host_batch["_position"][-1])
      if key_log is not None:
        keys = " ".join(k.decode() for k in host_batch["_key"])
        key_log.write(f"{step} {keys}\n")
      guard.add(step, metrics.pop("finite"))
      pending.append(metrics)
      if step == start_step + 1:
        progress.start()

      do_log, do_eval, do_save = common.due(step, total_steps, config)
      if not (do_log or do_eval or do_save):
        continue
      guard.check(checkpointer.newest_committed)
      if key_log is not None:
        key_log.flush()
      if do_log:
        means = common.mean_metrics(pending)
        loss_history.append((step, means["loss"]))
        rates = progress.update(step, {"loss": means["loss"],
                                       "acc": means["batch_accuracy"],
                                       "scale": means["logit_scale"],
                                       "lr": means["learning_rate"]})
        skipped = skip_stats.as_dict()
        writer.write_scalars(step, {**{f"train/{k}": v for k, v in means.items()},
                                    **{f"train/{k}": v for k, v in rates.items()},
                                    **{f"data/skipped_{k}": v for k, v in skipped.items()}})
        if skip_stats.total > reported_skips:
          reported_skips = skip_stats.total
          common.console(f"data: {skip_stats.summary()} so far")
          logging.warning("data: %s so far", skip_stats.summary())
      if do_eval and evaluators:
        eval_result = evaluate(step)
      if do_save:
        save(step)

    # Release the input pipeline now: its Python generator thread must finish while
    # the interpreter is still up.
    batches.close()
    if eval_result is None and evaluators:
      eval_result = evaluate(int(state.step))
    checkpointer.wait()
    saved_steps = checkpointer.all_steps()
    checkpointer.close()
  if key_log is not None:
    key_log.close()
  writer.close()  # flushes; finishes a W&B run

  result = {"step": int(state.step), "model_name": config.model_name,
            "num_params": int(num_params), "examples_seen": examples_seen,
            "skipped_samples": skip_stats.as_dict(),
            **{f"eval/{k}": v for k, v in (eval_result or {}).items()}}
  common.write_json(workdir / "results.json", result)
  result["train_loss_history"] = loss_history
  summary = [f"{k}: {100 * v:.2f}%" for k, v in (eval_result or {}).items()
             if k.endswith(("top1", "recall@1"))]
  common.console(
      f"\nfinished step {int(state.step)}: {'; '.join(summary) or 'no evaluations'}\n"
      f"data:        {skip_stats.summary()}\n"
      f"workdir:     {workdir}\n"
      f"tensorboard: tensorboard --logdir {workdir / 'tensorboard'}\n"
      f"checkpoints: {checkpointer.directory} (steps "
      f"{', '.join(map(str, saved_steps))})")
  return result
