"""Masked autoencoder pretraining (``config.trainer = "mae"``) of any plain ViT.

The model is ``vit_jax.models.mae.MaskedAutoencoder`` around ``config.model_name``
(with ``config.model``'s settings) and ``config.mae``'s masking ratio and decoder. The
loss is the normalised-pixel MSE on the masked patches. Labels are read but unused.
Each eval reports that loss on ``input.eval_split`` under a fixed mask and writes a
reconstruction picture (originals, masked inputs, reconstructions) to TensorBoard.

Fine-tune the result with the classification trainer: ``config.init=<this workdir>``
loads the encoder (the decoder is dropped and the load report says so).

Read top to bottom: setup, mesh, data, model and optimizer, train state and its
sharding, checkpoint restore, step function, evaluation, loop.
"""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import checkpoint as ckpt_lib
from vit_jax import config_checks, models, optim, sharding
from vit_jax.data import input_pipeline, preprocess
from vit_jax.models import mae
from vit_jax.trainers import common
from vit_jax.trainers.common import TrainState


def build_model(config: ml_collections.ConfigDict) -> mae.MaskedAutoencoder:
  """The MAE for ``config`` (its encoder: ``config.model_name`` with ``config.model``)."""
  backbone = models.create(config.model_name, num_classes=0, **config.model.to_dict())
  return mae.MaskedAutoencoder(backbone=mae.masked_vit(backbone), **config.mae.to_dict())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains ``config.model_name`` as an MAE on ``config.input.dataset``.

  Returns the final metrics (also written to ``workdir/results.json``) and, under
  ``train_loss_history``, the (step, mean loss) pairs of this run's log lines.
  """
  # ---------------------------------------------------------------- setup
  config_checks.validate(config)
  if config.get("grad_accum_steps", 1) != 1:
    raise ValueError("config.grad_accum_steps: the mae trainer takes 1 (no accumulation)")
  workdir = ckpt_lib.absolute(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = common.make_writer(workdir / "tensorboard", config)
  init_key, dropout_key, mask_key, eval_mask_key = jax.random.split(
      jax.random.key(config.seed), 4)  # eval_mask_key: the same mask at every eval

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  data_parallel = sharding.data_parallel_size(mesh)

  # ---------------------------------------------------------------- data
  builder = input_pipeline.get_builder(config.input.dataset, config.input.data_dir,
                                       download=config.input.download)
  global_batch = config.input.batch_size
  if global_batch % data_parallel:
    raise ValueError(f"input.batch_size={global_batch} must be divisible by the "
                     f"data-parallel devices ({data_parallel})")
  local_batch = input_pipeline.local_batch_size(global_batch)
  train_size = builder.info.splits[config.input.train_split].num_examples
  steps_per_epoch = train_size / global_batch
  total_steps = config.total_steps
  pp_train = preprocess.parse(config.input.pp_train)
  pp_eval = preprocess.parse(config.input.pp_eval)

  # ---------------------------------------------------------------- model and optimizer
  model = build_model(config)
  probe = input_pipeline.make_train_dataset(
      builder, config.input.train_split, preprocess_fn=pp_train, batch_size=1,
      seed=config.seed, shuffle_buffer=1)
  image_shape = (1,) + tuple(probe.element_spec["image"].shape[1:])
  patch_size = model.backbone.patch_size
  norm_pix = config.get("norm_pix_loss", True)
  schedule = optim.learning_rate_schedule(
      config.optimizer.learning_rate, total_steps,
      warmup_steps=config.schedule.warmup_steps, decay=config.schedule.decay,
      end_factor=config.schedule.end_factor)

  def init_variables(key):
    return model.init({"params": key, "mask": key, "dropout": key},
                      jnp.zeros(image_shape, jnp.float32), train=False)

  abstract_params = jax.eval_shape(init_variables, init_key)["params"]
  tx = optim.make_optimizer(config.optimizer, schedule, abstract_params)

  # ---------------------------------------------------------------- train state, sharded
  init_state = common.init_state_fn(init_variables, tx)
  abstract_state = jax.eval_shape(init_state, init_key)
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.get("sharding"))
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  num_encoder = sum(x.size for x in jax.tree.leaves(abstract_state.params["encoder"]))
  common.console(f"mae {config.model_name}: {num_encoder:,} encoder + "
                 f"{num_params - num_encoder:,} decoder parameters; mask ratio "
                 f"{model.mask_ratio}; mesh {dict(mesh.shape)}; {total_steps} steps of "
                 f"{global_batch} images ({total_steps / steps_per_epoch:.1f} epochs)")

  # ---------------------------------------------------------------- checkpoint restore
  checkpointer, state, restored = common.restore_or_init(
      config, workdir, init_state, init_key, abstract_state, state_shardings)
  if restored is not None:
    meta = restored.meta
    examples_seen = meta["examples_seen"]
    common.console(f"resumed from {checkpointer.directory / str(restored.step)} "
                   f"(step {restored.step})")
  else:
    meta, examples_seen = {}, 0
  start_step = int(state.step)
  common.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  data_shards = (config.input.get("data_shards") or meta.get("data_shards")
                 or jax.process_count())

  # ---------------------------------------------------------------- step function
  def loss_fn(params, images, rngs, train):
    pred, mask = model.apply({"params": params}, images, train=train, rngs=rngs)
    target = mae.pixel_target(images, patch_size, norm_pix)
    return mae.mae_loss(pred, target, mask), (pred, mask)

  def train_step(state: TrainState, batch):
    # Per-step keys from the step number: a resumed run masks exactly as before.
    rngs = {"dropout": jax.random.fold_in(dropout_key, state.step),
            "mask": jax.random.fold_in(mask_key, state.step)}
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch["image"], rngs, True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": schedule(state.step),
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  train_step = jax.jit(train_step, donate_argnums=0,
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))

  # ---------------------------------------------------------------- evaluation
  eval_ds, _ = input_pipeline.make_eval_dataset(
      builder, config.input.eval_split, preprocess_fn=pp_eval,
      batch_size=input_pipeline.local_batch_size(
          config.input.get("eval_batch_size") or global_batch),
      cache=config.input.cache)

  @jax.jit
  def eval_step(params, images, real):
    # The same mask key for every batch and eval: numbers comparable across steps.
    pred, mask = model.apply({"params": params}, images, train=False,
                             rngs={"mask": eval_mask_key})
    target = mae.pixel_target(images, patch_size, norm_pix)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1) * mask
    mask = mask * real[:, None]
    return {"sum": jnp.sum(per_patch * real[:, None]), "count": jnp.sum(mask)}, pred, mask

  def evaluate(step: int) -> dict:
    started = time.perf_counter()
    totals, picture = None, None
    for batch in input_pipeline.device_batches(eval_ds, batch_sharding):
      sums, pred, mask = eval_step(state.params, batch["image"],
                                   batch["_mask"].astype(jnp.float32))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      if picture is None:
        picture = mae.reconstruction_grid(batch["image"], pred, mask, patch_size, norm_pix)
    totals = jax.tree.map(float, jax.device_get(totals))
    result = {"loss": totals["sum"] / max(totals["count"], 1.0)}
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    writer.write_images(step, {"eval/reconstruction": np.asarray(jax.device_get(picture))})
    common.console(f"eval {config.input.dataset}:{config.input.eval_split} at step {step}: "
                   f"masked-patch loss {result['loss']:.4f} "
                   f"({time.perf_counter() - started:.1f}s)")
    return result

  def save(step: int) -> None:
    checkpointer.save(step, state, {"step": step, "examples_seen": examples_seen,
                                    "data_shards": data_shards, "trainer": "mae",
                                    "model_name": config.model_name,
                                    "model": config.model.to_dict()})

  # ---------------------------------------------------------------- loop
  train_ds = input_pipeline.make_train_dataset(
      builder, config.input.train_split, preprocess_fn=pp_train, batch_size=local_batch,
      seed=config.seed, start_position=examples_seen // jax.process_count(),
      shuffle_buffer=config.input.shuffle_buffer, cache=config.input.cache,
      num_shards=data_shards)
  batches = input_pipeline.device_batches(train_ds, batch_sharding)
  progress = common.ProgressLine(total_steps, start_step, global_batch)
  guard = common.NonFiniteGuard()
  pending, eval_result, loss_history = [], None, []

  with jax.set_mesh(mesh):
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = train_step(state, next(batches))
      examples_seen += global_batch
      guard.add(step, metrics.pop("finite"))
      pending.append(metrics)
      if step == start_step + 1:
        progress.start()

      do_log, do_eval, do_save = common.due(step, total_steps, config)
      if not (do_log or do_eval or do_save):
        continue
      guard.check(checkpointer.newest_committed)  # nothing diverged is saved
      if do_log:
        means = common.mean_metrics(pending)
        loss_history.append((step, means["loss"]))
        rates = progress.update(step, {"loss": means["loss"],
                                       "lr": means["learning_rate"]})
        writer.write_scalars(step, {f"train/{k}": v for k, v in {**means, **rates}.items()})
      if do_eval:
        eval_result = evaluate(step)
      if do_save:
        save(step)

    if eval_result is None:  # resumed after the last step: report the final state
      eval_result = evaluate(int(state.step))
    checkpointer.wait()
    checkpointer.close()
  writer.close()  # flushes; finishes a W&B run

  result = {"step": int(state.step), "model_name": config.model_name,
            "num_params": int(num_params),
            **{f"eval_{k}": v for k, v in eval_result.items()}}
  common.write_json(workdir / "results.json", result)
  result["train_loss_history"] = loss_history
  common.console(f"\nfinal masked-patch loss {eval_result['loss']:.4f} (step "
                 f"{int(state.step)})\nworkdir:     {workdir}\n"
                 f"tensorboard: tensorboard --logdir {workdir / 'tensorboard'}\n"
                 f"fine-tune:   --config.init={workdir}")
  return result
