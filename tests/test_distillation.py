"""DeiT-style distillation in the classification trainer.

The teacher is fixed and deliberately wrong in a learnable way: a linear classifier,
solved in closed form and written as a (zero-block) ViT checkpoint, that calls every
digit d "d + 1". A distilled DeiT student trained against it through the real trainer
must then split its two heads: the class head learns the labels, the distillation head
learns the teacher (agreement far above the 10% of chance, and far above what the class
head shows).
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import REPO, train_in_process
from vit_jax import checkpoint as ckpt_lib
from vit_jax import models, sharding
from vit_jax.data import input_pipeline, preprocess
from vit_jax.trainers import distillation

# A ViT with one 16x16 patch, no blocks and average pooling computes
# head(LayerNorm(W x + b)): with W from (ridge) least squares and an identity head, its
# argmax is that of the linear classifier.
TEACHER = dict(image_size=16, patch_size=16, hidden_size=16, num_layers=0, num_heads=1,
               mlp_dim=16, classifier="gap", num_classes=10)
STUDENT = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=2,
               mlp_dim=64)


def split_arrays(tfds_dir, split):
  builder = input_pipeline.get_builder("digits", data_dir=tfds_dir)
  dataset, _ = input_pipeline.make_eval_dataset(
      builder, split, preprocess_fn=preprocess.parse("decode|resize(16)|value_range(-1, 1)"),
      batch_size=2000)
  batch = next(input_pipeline.numpy_batches(dataset))
  mask = batch["_mask"]
  return batch["image"][mask], batch["label"][mask]


@pytest.fixture(scope="module")
def shifted_teacher(tfds_dir, tmp_path_factory):
  """A teacher checkpoint (vit_jax layout) of a linear classifier of labels + 1 (mod 10)."""
  images, labels = split_arrays(tfds_dir, "train")
  inputs = np.concatenate([images.reshape(len(images), -1), np.ones((len(images), 1))], 1)
  # Ridge regression: plain least squares is ill-conditioned here (the three colour
  # channels are equal, border pixels constant) and its huge weights break float32.
  targets = np.eye(10)[(labels + 1) % 10]
  solution = np.linalg.solve(inputs.T @ inputs + np.eye(inputs.shape[1]), inputs.T @ targets)
  width = TEACHER["hidden_size"]
  kernel = np.zeros((16 * 16 * 3, width), np.float32)
  kernel[:, :10] = solution[:-1]
  bias = np.zeros(width, np.float32)
  bias[:10] = solution[-1]
  params = {
      "embedding": {"kernel": kernel.reshape(16, 16, 3, width), "bias": bias},
      "Transformer": {"posembed_input": {"pos_embedding": np.zeros((1, 1, width))},
                      "encoder_norm": {"scale": np.ones(width), "bias": np.zeros(width)}},
      "head": {"kernel": np.eye(width)[:, :10], "bias": np.zeros(10)},
  }
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  workdir = tmp_path_factory.mktemp("teacher")
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  checkpointer.save(1, {"params": params, "model_state": {}}, {"step": 1})
  checkpointer.close()
  test_images, test_labels = split_arrays(tfds_dir, "test")
  model = models.create("vit_tiny_patch16_224", **TEACHER)
  predictions = np.argmax(model.apply({"params": params}, test_images), -1)
  return str(workdir), test_images, test_labels, predictions


def distill_config(teacher_dir, **changes) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "teacher_model": "vit_tiny_patch16_224", "teacher": dict(TEACHER),
      "teacher_checkpoint": teacher_dir, "type": "hard", "alpha": 0.5, "tau": 1.0,
      **changes})


def test_distillation_head_learns_the_teacher(tfds_dir, tmp_path, shifted_teacher):
  teacher_dir, images, labels, teacher_predictions = shifted_teacher
  # The teacher is what we built: mostly "d + 1", spread over all ten classes.
  print(f"teacher: {np.mean(teacher_predictions == (labels + 1) % 10):.1%} 'd + 1'")
  assert np.mean(teacher_predictions == (labels + 1) % 10) > 0.8
  assert np.bincount(teacher_predictions, minlength=10).max() < 0.2 * len(labels)

  result = train_in_process(
      tfds_dir, tmp_path, "deit_tiny_distilled_patch16_224", steps=400,
      learning_rate=5e-3, **STUDENT, config_overrides={
          "distillation": distill_config(teacher_dir),
          # No random shifts: the linear teacher is not shift-invariant.
          "input.pp_train": "decode|resize(16)|value_range(-1, 1)"})
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.5, losses  # the DeiT family trains

  student = models.create("deit_tiny_distilled_patch16_224", num_classes=10, **STUDENT)
  state = ckpt_lib.load_state_arrays(str(ckpt_lib.latest_step_dir(str(tmp_path))))
  logits, logits_dist = student.apply({"params": state["params"]}, images, train=True)
  agree_dist = np.mean(np.argmax(logits_dist, -1) == teacher_predictions)
  agree_cls = np.mean(np.argmax(logits, -1) == teacher_predictions)
  accuracy_cls = np.mean(np.argmax(logits, -1) == labels)
  print(f"distillation head agrees with the teacher on {agree_dist:.1%} of the test "
        f"digits; class head: {agree_cls:.1%} (its accuracy {accuracy_cls:.1%})")
  # Measured: 89% / 90% / 2% (chance: 10% each).
  assert agree_dist > 0.7
  assert accuracy_cls > 0.7  # the class head learned the labels...
  assert agree_cls < 0.15  # ...so it disagrees with this teacher


def test_teacher_errors_are_clear(shifted_teacher, tmp_path):
  teacher_dir = shifted_teacher[0]
  mesh = sharding.make_mesh({"data": -1})
  load = lambda cfg, shape=(1, 16, 16, 3): distillation.load_teacher(cfg, 10, shape, mesh)
  model, variables = load(distill_config(teacher_dir))  # fits
  step_dir = os.path.join(teacher_dir, "checkpoints", "1")
  load(distill_config(step_dir))  # a step directory works too
  with pytest.raises(distillation.TeacherError, match="no teacher checkpoint under"):
    load(distill_config(str(tmp_path / "nothing")))
  wider = distill_config(teacher_dir)
  wider.teacher.hidden_size = 48
  with pytest.raises(distillation.TeacherError,
                     match=r"does not fit teacher vit_tiny_patch16_224 .*shape mismatch: params/"
                           r"Transformer/encoder_norm/bias: expected \(48,\), found \(16,\)"):
    load(wider)
  with pytest.raises(distillation.TeacherError, match="cannot take the student's input "
                                                      r"images of shape \(1, 32, 32, 3\)"):
    load(distill_config(teacher_dir), shape=(1, 32, 32, 3))
  with pytest.raises(distillation.TeacherError,
                     match="predicts 10 classes, the dataset has 7"):
    distillation.load_teacher(distill_config(teacher_dir), 7, (1, 16, 16, 3), mesh)
  with pytest.raises(distillation.TeacherError, match="type must be one of"):
    load(distill_config(teacher_dir, type="medium"))
  with pytest.raises(distillation.TeacherError, match=r"alpha must be in \[0, 1\]"):
    load(distill_config(teacher_dir, alpha=1.5))


def test_distillation_losses():
  rs = np.random.RandomState(0)
  student, teacher = (jnp.asarray(rs.randn(4, 5), jnp.float32) for _ in range(2))
  hard = distillation.distillation_loss(student, teacher, "hard", 1.0)
  expected = optax.softmax_cross_entropy_with_integer_labels(
      student, jnp.argmax(teacher, -1)).mean()
  np.testing.assert_allclose(hard, expected, rtol=1e-6)
  tau = 2.0
  p = jax.nn.softmax(teacher / tau)
  kl = np.sum(p * (np.log(p) - jax.nn.log_softmax(student / tau)), -1).mean()
  np.testing.assert_allclose(distillation.distillation_loss(student, teacher, "soft", tau),
                             tau ** 2 * kl, rtol=1e-5)
  assert abs(distillation.distillation_loss(teacher, teacher, "soft", tau)) < 1e-6
  # Only the student is trained: no gradient reaches the teacher's logits.
  grad = jax.grad(lambda t: distillation.distillation_loss(student, t, "soft", tau))(teacher)
  np.testing.assert_array_equal(grad, 0.0)


def test_digits_config():
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import digits_deit_distilled  # pylint: disable=g-import-not-at-top
  config = digits_deit_distilled.get_config()
  distillation.check_config(config.distillation)
  assert models.create(config.model_name, **config.model).distilled_training
  assert models.create(config.distillation.teacher_model, **config.distillation.teacher)
  assert digits_deit_distilled.get_config("baseline").distillation is None
