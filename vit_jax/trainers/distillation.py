"""DeiT-style knowledge distillation for the classification trainer.

A frozen teacher, restored from another vit_jax run's checkpoint, labels every training
batch (eval mode, inside the jitted step); the student's distillation head learns those
labels while its class head learns the dataset's. The teacher is neither trained nor
checkpointed. Set ``config.distillation`` (absent or None: plain training)::

  teacher_model        registered name of the teacher, e.g. "vit_tiny_patch16_224"
  teacher              overrides for the teacher, like ``config.model`` for the student
                       (``num_classes`` defaults to the dataset's)
  teacher_checkpoint   a vit_jax workdir (its latest checkpoint is used), its
                       ``checkpoints`` directory, or one step directory
  type                 "hard": the teacher's argmax is the label (DeiT's best), or
                       "soft": match the teacher's softmax at temperature ``tau``
  alpha                weight of the distillation term; the label term gets 1 - alpha
  tau                  temperature for "soft"

The loss (DeiT, eq. 2 and 3), for a student that returns ``(logits, logits_dist)`` in
training (the distilled DeiTs)::

  (1 - alpha) * CE(logits, labels) + alpha * D(logits_dist, teacher_logits)

  hard: D = CE(logits_dist, argmax(teacher_logits))
  soft: D = tau^2 * KL(softmax(teacher_logits / tau) || softmax(logits_dist / tau)),
        summed over classes and averaged over the batch (DeiT's code divides by the
        number of logits instead, i.e. by num_classes more).

A single-head student distils through its only head (classic Hinton distillation). The
teacher sees the student's input images; its input size must therefore fit them.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import checkpoint as ckpt_lib
from vit_jax import models, sharding, workdir
from vit_jax import losses
from vit_jax.trainers import common

TYPES = ("hard", "soft")
# The loss lives in vit_jax/losses.py, which imports no TensorFlow (the early-exit
# heads use it too); this name stays for the trainer and the tests.
distillation_loss = losses.distillation_loss


class TeacherError(ValueError):
  """The teacher's settings or checkpoint do not work; the message says which."""


def check_config(config: ml_collections.ConfigDict) -> None:
  for key in ("teacher_model", "teacher_checkpoint", "type", "alpha", "tau"):
    if config.get(key) is None:
      raise TeacherError(f"config.distillation.{key} is not set")
  if config.type not in TYPES:
    raise TeacherError(f"config.distillation.type must be one of {TYPES}, got "
                       f"{config.type!r}")
  if not 0.0 <= config.alpha <= 1.0:
    raise TeacherError(f"config.distillation.alpha must be in [0, 1], got {config.alpha}")
  if config.tau <= 0:
    raise TeacherError(f"config.distillation.tau must be positive, got {config.tau}")


def load_teacher(config: ml_collections.ConfigDict, num_classes: int,
                 image_shape: tuple[int, ...], mesh) -> tuple[Any, Any]:
  """Creates the teacher and restores its variables, replicated over ``mesh``.

  Returns ``(model, variables)``. Raises TeacherError naming the problem when the
  checkpoint is missing or does not fit the configured teacher, or when the teacher
  cannot take the student's images.
  """
  check_config(config)
  overrides = {"num_classes": num_classes, **(config.get("teacher") or {})}
  model = models.create(config.teacher_model, **overrides)
  images = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  try:
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), expected, images)
  except ValueError as e:
    raise TeacherError(f"teacher {config.teacher_model} cannot take the student's input "
                       f"images of shape {image_shape}: {e}") from e
  if logits.shape[-1] != num_classes:
    raise TeacherError(f"teacher {config.teacher_model} predicts {logits.shape[-1]} "
                       f"classes, the dataset has {num_classes}")

  try:
    # Read straight into replicated arrays (every host restores what its devices hold).
    variables, step_dir = workdir.read_variables(config.teacher_checkpoint,
                                                 sharding=sharding.replicated(mesh))
  except FileNotFoundError as e:
    raise TeacherError(f"no teacher checkpoint under {config.teacher_checkpoint}: point "
                       "config.distillation.teacher_checkpoint at the workdir of the "
                       "teacher's training run (or one of its step directories)") from e
  report = ckpt_lib.describe_mismatch(*ckpt_lib.compare_trees(expected, variables))
  if report:
    raise TeacherError(
        f"teacher checkpoint {step_dir} does not fit teacher {config.teacher_model} "
        f"with {overrides} ({report}). Set config.distillation.teacher_model and "
        ".teacher to the model and settings of the run that wrote it.")
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  common.console(f"distillation: teacher {config.teacher_model} ({count:,} parameters) "
                 f"from {step_dir}; {config.type} targets, alpha {config.alpha}, "
                 f"tau {config.tau}")
  return model, variables


def split_heads(outputs) -> tuple[jax.Array, Optional[jax.Array]]:
  """``(logits, logits_dist)`` of a two-head student, ``(logits, None)`` otherwise."""
  if isinstance(outputs, (tuple, list)):
    logits, logits_dist = outputs
    return logits, logits_dist
  return outputs, None
