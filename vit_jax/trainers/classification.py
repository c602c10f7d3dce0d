"""Supervised image classification: pretraining from scratch and fine-tuning.

Fine-tuning (``configs/finetune.py``) adds, each off unless configured: ``init``
(pretrained weights in any format through ``vit_jax.weights.load``: new head,
resampled position embedding),
``input.classes`` (a class subset), ``freeze``/``train_only`` regexes,
``optimizer.layer_decay``, ``ema_decay`` (the EMA is what gets evaluated),
``mixup`` (mixup/cutmix, or MixPro with ``mixup.mixpro_alpha``) and ``lora``; see
``vit_jax/finetune.py``.
``flexi_patch_sizes`` (FlexiViT) trains a ViT at a patch size drawn per step from the
list (one compiled step per size; the model's ``flexi_patch_size`` is what evaluates).
``model.naflex`` with a pp ending in ``naflex(...)`` trains NaFlex on patch inputs;
``input.packing`` (``seq_len``, ``images_per_pack``) packs them NaViT-style, several
images per sequence, ``input.batch_size`` packs per step (``vit_jax.data.packing``).

Read top to bottom: setup, mesh, data, model and optimizer, distillation teacher
(optional), train state and its sharding, checkpoint restore, step functions,
evaluators, loop. One process per host runs this same code; JAX's multi-controller
runtime joins them into one program.
"""

import functools
import json
import time

import numpy as np

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import checkpoint as ckpt_lib
from vit_jax import (config_checks, finetune, lora, models, optim, quantization, sharding,
                     sparsity, weights)
from vit_jax.data import input_pipeline, packing as packing_lib, preprocess
from vit_jax.evaluators import classification as classification_eval
from vit_jax.models import moe
from vit_jax.trainers import common, distillation, dynamic_vit, pictures as pictures_lib
from vit_jax.trainers.common import TrainState


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Integer labels (``[batch]``, or ``[packs, images]`` with -1 in a pack's empty image
  slots, which count nowhere), or float soft targets ``[batch, classes]`` (mixup)."""
  if jnp.issubdtype(labels.dtype, jnp.floating):
    return optax.softmax_cross_entropy(logits, labels).mean()
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  valid = labels >= 0
  losses = optax.softmax_cross_entropy(logits, targets)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)


def flexi_patch_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """``config.flexi_patch_sizes`` (a list, or "8,12,16" from the command line) checked."""
  sizes = config.get("flexi_patch_sizes") or ()
  if isinstance(sizes, str):
    sizes = [s for s in sizes.replace(" ", "").split(",") if s]
  try:
    sizes = tuple(int(s) for s in sizes)
  except (TypeError, ValueError):
    raise ValueError("config.flexi_patch_sizes must be a list of positive integers, got "
                     f"{config.get('flexi_patch_sizes')!r}") from None
  if any(s < 1 for s in sizes):
    raise ValueError(f"config.flexi_patch_sizes must be positive integers, got {sizes}")
  return sizes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model_name`` on ``config.input.dataset``.

  Returns the final metrics (also written to ``workdir/results.json``) and, under
  ``train_loss_history``, the (step, mean loss) pairs of this run's log lines.
  """
  # ---------------------------------------------------------------- setup
  config_checks.validate(config)
  workdir = ckpt_lib.absolute(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = common.make_writer(workdir / "tensorboard", config)
  base_key = jax.random.key(config.seed)
  init_key, dropout_key = jax.random.split(base_key)

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  data_parallel = sharding.data_parallel_size(mesh)

  # ---------------------------------------------------------------- data
  builder = input_pipeline.get_builder(config.input.dataset, config.input.data_dir,
                                       download=config.input.download)
  global_batch = config.input.batch_size
  accum = config.grad_accum_steps
  if global_batch % (data_parallel * accum):
    raise ValueError(f"input.batch_size={global_batch} must be divisible by the "
                     f"data-parallel devices ({data_parallel}) times grad_accum_steps "
                     f"({accum})")
  local_batch = input_pipeline.local_batch_size(global_batch)
  train_size = builder.info.splits[config.input.train_split].num_examples
  steps_per_epoch = train_size / global_batch
  total_steps = config.total_steps
  if config.get("num_epochs"):
    total_steps = int(round(config.num_epochs * steps_per_epoch))
  if not total_steps or total_steps <= 0:
    raise ValueError("set config.total_steps or config.num_epochs to a positive number")
  pp_train = preprocess.parse(config.input.pp_train)
  pp_eval = preprocess.parse(config.input.pp_eval)
  num_classes = builder.info.features["label"].num_classes
  keep_labels = config.input.get("classes") or None  # fine-tune on a class subset
  if keep_labels:
    if isinstance(keep_labels, str):  # "0,1,2" from the command line
      keep_labels = keep_labels.split(",")
    keep_labels = [int(c) for c in keep_labels]
    num_classes = len(keep_labels)

  # ---------------------------------------------------------------- model and optimizer
  model_kwargs = {"num_classes": num_classes, **config.model.to_dict()}
  model = models.create(config.model_name, **model_kwargs)
  probe = input_pipeline.make_train_dataset(
      builder, config.input.train_split, preprocess_fn=pp_train, batch_size=1,
      seed=config.seed, shuffle_buffer=1, keep_labels=keep_labels)
  # One example's model input: an NHWC image, or the naflex pp op's dict of patches.
  image_spec = probe.element_spec["image"]
  image_shape = jax.tree.map(lambda s: (1,) + tuple(s.shape[1:]), image_spec)
  # NaViT packing (None: off): checked against the pp's output and the model.
  packing = packing_lib.from_config(
      config.input.get("packing"), patch_inputs=isinstance(image_spec, dict),
      naflex_model=bool(config.model.get("naflex")),
      streams=max(jax.process_count(), config.input.get("data_shards") or 1))
  schedule = optim.learning_rate_schedule(
      config.optimizer.learning_rate, total_steps,
      warmup_steps=config.schedule.warmup_steps, decay=config.schedule.decay,
      end_factor=config.schedule.end_factor)

  def example_inputs():
    return jax.tree.map(lambda s: jnp.zeros((1,) + tuple(s.shape[1:]),
                                            jnp.float32 if s.dtype.is_floating
                                            else s.dtype.as_numpy_dtype), image_spec)

  # QAT; settings that reach no weight are an error (checked on one example's shape).
  model = quantization.from_config(model, config.get("quantization"),
                                   check_inputs=(example_inputs(),))
  lora_config = config.get("lora")
  if lora_config and lora_config.get("rank"):
    model = lora.LoRA(base=model, rank=lora_config.rank, alpha=lora_config.alpha,
                      targets=lora_config.get("targets") or lora.VIT_ATTENTION_MLP)

  def init_variables(key):
    return model.init({"params": key, "dropout": key}, example_inputs(), train=False)

  abstract_params = jax.eval_shape(init_variables, init_key)["params"]
  # TensorBoard pictures (input grid, attention maps, parameter-norm histograms).
  pictures = pictures_lib.Pictures(writer, model, config,  # of NHWC images only
                                   enabled=config.get("tensorboard_pictures", True)
                                   and not isinstance(image_spec, dict))
  tx = optim.make_optimizer(config.optimizer, schedule, abstract_params)
  tx = sparsity.from_config(tx, abstract_params, config.get("sparsity"))
  train_only = config.get("train_only")
  if lora_config and lora_config.get("rank") and not train_only:
    train_only = r"^lora__|^head/"  # LoRA trains the adapters and the head only
  ema_decay = config.get("ema_decay")
  if config.optimizer.get("layer_decay") or config.get("freeze") or train_only or ema_decay:
    tx = finetune.wrap_optimizer(tx, abstract_params,
                                 layer_decay=config.optimizer.get("layer_decay"),
                                 freeze=config.get("freeze"), train_only=train_only,
                                 ema_decay=ema_decay)
    if config.get("freeze") or train_only:
      common.console(finetune.describe_trainable(abstract_params, finetune.trainable_mask(
          abstract_params, freeze=config.get("freeze"), train_only=train_only)))
  # EWA (moe.router="ewa"): the experts are averaged after the update, so it goes last.
  tx = moe.ewa_from_config(tx, config.model.get("moe"))

  # FlexiViT: the stored kernel and position table serve every patch size in the list.
  flexi_sizes = flexi_patch_sizes(config)
  if flexi_sizes and not hasattr(model, "flexi_patch_size"):
    raise ValueError(f"config.flexi_patch_sizes needs a plain ViT; {config.model_name} "
                     "(with its quantization/LoRA wrappers) has no flexi_patch_size")
  for size in flexi_sizes:  # fail now if a size cannot run on the training images
    jax.eval_shape(lambda key, size=size: model.clone(flexi_patch_size=size).init(
        {"params": key, "dropout": key}, example_inputs()), init_key)

  # ---------------------------------------------------------------- distillation teacher
  # DeiT-style (see trainers/distillation.py): a frozen teacher from another run's
  # checkpoint labels each batch in eval mode; it is not trained and not checkpointed.
  distill = config.get("distillation")
  teacher, teacher_variables = None, None
  if distill:
    teacher, teacher_variables = distillation.load_teacher(distill, num_classes,
                                                           image_shape, mesh)
  # DynamicViT (token_pruning): the keep-ratio loss comes from the model's "aux"
  # collection; config.dynamic_vit adds distillation from the un-pruned model.
  if distill and (config.get("dynamic_vit") or {}).get("distill_weight"):
    raise ValueError("config.distillation and config.dynamic_vit.distill_weight both "
                     "set a teacher: use one of them")
  dyn_distiller, dyn_teacher_variables = dynamic_vit.setup(
      config.get("dynamic_vit"), model, config.model_name, model_kwargs, num_classes,
      image_shape, mesh)
  if dyn_teacher_variables is not None:  # it travels in the teacher's argument
    teacher_variables = dyn_teacher_variables

  # ---------------------------------------------------------------- train state, sharded
  init_state = common.init_state_fn(init_variables, tx)
  abstract_state = jax.eval_shape(init_state, init_key)
  # Parameters and optimizer state by config.sharding's rules (FSDP over "fsdp",
  # heads and MLP units over "tensor"); see vit_jax/sharding.py.
  state_shardings = sharding.state_shardings(abstract_state, mesh, config.get("sharding"))
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  common.console(f"model {config.model_name}: {num_params:,} parameters; "
                 f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es); "
                 + (f"{total_steps} steps of {global_batch} packs of {packing.seq_len} "
                    f"tokens ({config.input.dataset}:{config.input.train_split})"
                    if packing else
                    f"{total_steps} steps of {global_batch} images "
                    f"({total_steps / steps_per_epoch:.1f} epochs of "
                    f"{config.input.dataset}:{config.input.train_split})"))

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
    if config.get("init"):  # fine-tuning: pretrained weights, fresh optimizer state
      reinit = config.get("init_reinit") or r"^head/"
      if lora_config and lora_config.get("rank"):
        reinit += r"|^lora__"
      fresh = {"params": jax.device_get(state.params),
               **jax.device_get(dict(state.model_state))}
      variables, report = weights.load(
          config.init, model, fresh, model_name=config.model_name, reinit=reinit,
          allow_partial=bool(config.get("init_allow_partial")))
      common.console(f"init: {report.summary()}")
      params = variables.pop("params")
      state = jax.jit(lambda p, ms: TrainState(
          step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), model_state=ms),
          out_shardings=state_shardings)(params, variables)
  start_step = int(state.step)
  # Only now that the checkpoint is known to fit: the workdir describes what it holds.
  common.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  # The data stream is fixed by its shard count (default: one shard per process, or
  # what the checkpoint used), so a run resumes identically on another process count.
  data_shards = (config.input.get("data_shards") or meta.get("data_shards")
                 or jax.process_count())
  state_bytes, state_bytes_total = sharding.bytes_per_device(state)
  common.console(f"train state: {state_bytes / 2**20:,.2f} MiB per device "
                 f"({state_bytes_total / 2**20:,.2f} MiB in all)")

  # ---------------------------------------------------------------- step functions
  def compute_grads(params, model_state, images, labels, rng, teacher_variables,
                    step_model):
    # "aux": the auxiliary losses MoE routers sow (none for other models).
    mutable = [*model_state, moe.AUX_COLLECTION]
    teacher_logits = (None if teacher is None else
                      teacher.apply(teacher_variables, images, train=False))
    apply_kwargs = {}
    if mixpro:  # MixPro reads the last block's query and key of this same forward
      labels, patch_mask, area_lam = labels
      apply_kwargs = {"capture_intermediates": finetune.last_block_qk_filter(model)}
      mutable = [*mutable, "intermediates"]
    if dyn_distiller is not None:  # the normed tokens and the last keep marks
      dyn_teacher = dyn_distiller.teacher_outputs(params, model_state, teacher_variables,
                                                  images)
      apply_kwargs = {"capture_intermediates": dynamic_vit.final_norm_filter}
      mutable = [*mutable, "intermediates"]

    def loss_fn(params):
      outputs, new_state = step_model.apply({"params": params, **model_state}, images,
                                            train=True, rngs={"dropout": rng},
                                            mutable=mutable, **apply_kwargs)
      new_model_state, aux_loss, aux_metrics = common.split_auxiliary(new_state)
      # A distilled model (DeiT) returns (class head, distillation head) in training.
      logits, logits_dist = distillation.split_heads(outputs)
      if mixpro:
        targets = finetune.attention_labels(
            finetune.last_block_class_attention(new_model_state.pop("intermediates"),
                                                model),
            patch_mask, area_lam, jax.nn.softmax(logits), labels, num_classes,
            config.label_smoothing)[0]
      loss = cross_entropy(logits, targets if mixpro else labels, num_classes,
                           config.label_smoothing)
      if dyn_distiller is not None:
        dyn_loss, dyn_metrics = dyn_distiller.loss(
            logits, new_model_state.pop("intermediates"), *dyn_teacher)
        loss = loss + dyn_loss
        aux_metrics = {**aux_metrics, **dyn_metrics}
      if teacher is not None:  # the distillation head (or the only head) learns the teacher
        distill_loss = distillation.distillation_loss(
            logits if logits_dist is None else logits_dist, teacher_logits,
            distill.type, distill.tau)
        loss = (1 - distill.alpha) * loss + distill.alpha * distill_loss
      elif logits_dist is not None:  # no teacher: both heads learn the labels
        loss = (loss + cross_entropy(logits_dist, targets if mixpro else labels,
                                     num_classes, config.label_smoothing)) / 2
      if logits_dist is not None:  # what the model predicts at eval
        logits = (logits + logits_dist) / 2
      return loss + aux_loss, (logits, new_model_state, aux_metrics)

    (loss, (logits, new_model_state, aux_metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    hard = jnp.argmax(labels, -1) if soft else labels  # (MixPro: own label)
    valid = hard >= 0  # a pack's empty image slots (label -1) count nowhere
    accuracy = (jnp.sum((jnp.argmax(logits, -1) == hard) & valid)
                / jnp.maximum(jnp.sum(valid), 1))
    return grads, loss, accuracy, new_model_state, aux_metrics

  mix_config = config.get("mixup")
  mixing = bool(mix_config and (mix_config.get("mixup_alpha") or
                                mix_config.get("cutmix_alpha")))

  mixpro = bool(mix_config and mix_config.get("mixpro_alpha"))
  if mixpro and mixing:
    raise ValueError("mixup.mixpro_alpha replaces mixup/cutmix: set mixup.mixup_alpha "
                     "and mixup.cutmix_alpha to 0")
  if (mixing or mixpro) and distill:
    raise ValueError("distillation with mixup/cutmix/MixPro is not supported: the "
                     "distillation loss takes hard labels")
  if mixpro and dyn_distiller is not None:
    raise ValueError("mixup.mixpro_alpha cannot be combined with "
                     "config.dynamic_vit.distill_weight (both read this forward's "
                     "intermediates)")
  if packing and (mixing or mixpro or distill or flexi_sizes or dyn_distiller):
    raise ValueError("input.packing cannot be combined with mixup/cutmix/MixPro, "
                     "distillation, dynamic_vit or flexi_patch_sizes (they take whole "
                     "NHWC images)")
  if mixpro:
    finetune.check_mixpro_model(model)
    if flexi_sizes:  # MaskMix cells and attention labels assume the stored patch grid
      raise ValueError("mixup.mixpro_alpha cannot be combined with config.flexi_patch_sizes")

  def train_step(state: TrainState, batch, teacher_variables, patch_size=None):
    step_model = model if patch_size is None else model.clone(flexi_patch_size=patch_size)
    rng = jax.random.fold_in(dropout_key, state.step)
    images, labels = batch["image"], batch["label"]
    if mixing:  # soft targets (label smoothing folded in)
      images, labels = finetune.mix(
          jax.random.fold_in(rng, 1 << 20), images, labels, num_classes,
          mixup_alpha=mix_config.get("mixup_alpha", 0.0),
          cutmix_alpha=mix_config.get("cutmix_alpha", 0.0),
          switch_prob=mix_config.get("switch_prob", 0.5),
          label_smoothing=config.label_smoothing)
    if mixpro:  # MaskMix now; the labels come from the forward pass (compute_grads)
      images, patch_mask, area_lam = finetune.mask_mix(
          jax.random.fold_in(rng, 1 << 20), images, alpha=mix_config.mixpro_alpha,
          cell=mix_config.get("mixpro_cell") or model.patch_size,
          patch_size=model.patch_size)
      labels = (labels, patch_mask, area_lam)
    if accum == 1:
      grads, loss, accuracy, model_state, aux_metrics = compute_grads(
          state.params, state.model_state, images, labels, rng, teacher_variables,
          step_model)
    else:
      # Microbatch i takes every accum-th example, so each device keeps its rows.
      split = lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
      images, labels = jax.tree.map(split, images), jax.tree.map(split, labels)

      def microbatch(i, carry):
        grads_sum, loss_sum, acc_sum, aux_sum, model_state = carry
        grads, loss, accuracy, model_state, aux_metrics = compute_grads(
            state.params, model_state, jax.tree.map(lambda x: x[:, i], images),
            jax.tree.map(lambda x: x[:, i], labels),
            jax.random.fold_in(rng, i), teacher_variables, step_model)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
                acc_sum + accuracy, jax.tree.map(jnp.add, aux_sum, aux_metrics),
                model_state)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      aux_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
          lambda *args: compute_grads(*args, step_model), state.params, state.model_state,
          jax.tree.map(lambda x: x[:, 0], images), jax.tree.map(lambda x: x[:, 0], labels),
          rng,
          teacher_variables)[4])
      grads, loss, accuracy, aux_metrics, model_state = jax.lax.fori_loop(
          0, accum, microbatch, (zeros, 0.0, 0.0, aux_zeros, state.model_state))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, accuracy = loss / accum, accuracy / accum
      aux_metrics = jax.tree.map(lambda m: m / accum, aux_metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    # "loss" includes the auxiliary losses (MoE's, DynamicViT's keep ratio) and the
    # DynamicViT distillation terms, logged apart as moe/*, dynamic_vit/* (if any).
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
               "learning_rate": schedule(state.step), **aux_metrics,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  # One compiled step per FlexiViT patch size (None: the model's own), built on use.
  compiled_steps = {}

  def compiled_step(patch_size=None):
    if patch_size not in compiled_steps:
      compiled_steps[patch_size] = jax.jit(
          functools.partial(train_step, patch_size=patch_size), donate_argnums=0,
          in_shardings=(state_shardings, batch_sharding, sharding.replicated(mesh)),
          out_shardings=(state_shardings, sharding.replicated(mesh)))
    return compiled_steps[patch_size]

  # ---------------------------------------------------------------- evaluators
  def predict(variables, images):
    return model.apply(variables, images, train=False)

  evaluator = classification_eval.ClassificationEvaluator(
      predict, builder, config.input.eval_split, preprocess_fn=pp_eval,
      batch_size=config.input.get("eval_batch_size") or global_batch,
      sharding=batch_sharding, cache=config.input.cache, keep_labels=keep_labels)

  # Fail now, not at the first eval, if the eval images do not fit the model.
  jax.eval_shape(predict, {"params": abstract_state.params, **abstract_state.model_state},
                 evaluator.image_spec)
  if pictures.enabled:
    pictures.set_eval_images(evaluator.first_images(pictures.num_images))

  def evaluate(step: int) -> dict:
    started = time.perf_counter()
    params = state.params
    if ema_decay:  # evaluate the moving average (what a fine-tune keeps)
      params = finetune.ema_params(state.opt_state, state.params)
    result = evaluator.run({"params": params, **state.model_state})
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    pictures.evaluation(step, {"params": params, **state.model_state})
    common.console(f"eval {config.input.dataset}:{config.input.eval_split} at step "
                   f"{step}: top-1 {100 * result['top1']:.2f}% | top-5 "
                   f"{100 * result['top5']:.2f}% | loss {result['loss']:.4f} "
                   f"({result['count']} images, {time.perf_counter() - started:.1f}s)")
    return result

  def save(step: int) -> None:
    checkpointer.save(step, state, {"step": step, "examples_seen": examples_seen,
                                    "data_shards": data_shards,
                                    "model_name": config.model_name,
                                    "model": model_kwargs})

  # ---------------------------------------------------------------- loop
  train_ds = input_pipeline.make_train_dataset(
      builder, config.input.train_split, preprocess_fn=pp_train,
      batch_size=1 if packing else local_batch,
      seed=config.seed, start_position=examples_seen // jax.process_count(),
      shuffle_buffer=config.input.shuffle_buffer, cache=config.input.cache,
      num_shards=data_shards, keep_labels=keep_labels)
  if packing:  # batches of packs, a varying number of images each ("_examples")
    train_ds = packing_lib.packed_batches(
        input_pipeline.numpy_batches(train_ds), packing.seq_len, packing.images_per_pack,
        local_batch)
  batches = input_pipeline.device_batches(train_ds, batch_sharding)
  progress = common.ProgressLine(total_steps, start_step, global_batch)
  guard = common.NonFiniteGuard()
  pending = []  # per-step metrics on device, fetched at the next sync point
  eval_result = None
  loss_history = []  # (step, mean train loss since the previous log line)
  # config.profile_steps: a trace of the steps after the compiling one (TensorBoard's
  # Profile tab reads tensorboard/plugins/profile/). By hand rather than clu's Profile
  # action, which leaves its session open when the run ends inside the window.
  profile_steps = config.get("profile_steps") or 0
  profile_first, profiling = start_step + 2, False

  with jax.set_mesh(mesh):
    if start_step < total_steps:
      common.console(f"compiling the train step (first step {start_step + 1})...")
    for step in range(start_step + 1, total_steps + 1):
      patch_size = None
      if flexi_sizes:  # a function of (seed, step): a resumed run draws the same sizes
        draw = np.random.default_rng((config.seed, step)).integers(len(flexi_sizes))
        patch_size = flexi_sizes[draw]
      batch = next(batches)
      examples_seen += batch.pop("_examples", global_batch)  # packs: images in them
      if step == 1:  # what the model sees, after preprocessing
        pictures.inputs(0, batch["image"])
      if profile_steps and step == profile_first:
        jax.profiler.start_trace(str(workdir / "tensorboard"))
        profiling = True
      state, metrics = compiled_step(patch_size)(state, batch, teacher_variables)
      if profiling and step == profile_first + profile_steps - 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
      guard.add(step, metrics.pop("finite"))
      pending.append(metrics)
      if step == start_step + 1:
        progress.start(examples_seen)

      do_log, do_eval, do_save = common.due(step, total_steps, config)
      if not (do_log or do_eval or do_save):
        continue
      # Sync point: nothing diverged may reach a checkpoint.
      guard.check(checkpointer.newest_committed)
      if do_log:
        means = common.mean_metrics(pending)
        loss_history.append((step, means["loss"]))
        rates = progress.update(step, {"loss": means["loss"],
                                       "lr": means["learning_rate"]}, examples_seen)
        writer.write_scalars(step, {f"train/{k}": v for k, v in {**means, **rates}.items()})
      if do_eval:
        eval_result = evaluate(step)
      if do_save:
        save(step)

    if profiling:  # the run ended inside the profiled window
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
    if eval_result is None:  # resumed after the last step: report the final state
      eval_result = evaluate(int(state.step))
    checkpointer.wait()
    saved_steps = checkpointer.all_steps()
    checkpointer.close()
  writer.close()  # flushes; finishes a W&B run

  result = {"step": int(state.step), "model_name": config.model_name,
            "num_params": int(num_params), "state_bytes_per_device": state_bytes,
            "examples_seen": examples_seen,
            **{f"eval_{k}": v for k, v in eval_result.items()}}
  common.write_json(workdir / "results.json", result)
  result["train_loss_history"] = loss_history
  common.console(
      f"\nfinal {config.input.dataset}:{config.input.eval_split} top-1 accuracy: "
      f"{100 * eval_result['top1']:.2f}% ({eval_result['count']} images, step "
      f"{int(state.step)})\n"
      f"workdir:     {workdir}\n"
      f"tensorboard: tensorboard --logdir {workdir / 'tensorboard'}\n"
      f"checkpoints: {checkpointer.directory} (steps "
      f"{', '.join(map(str, saved_steps))})")
  return result
