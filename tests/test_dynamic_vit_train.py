"""DynamicViT training: the keep-ratio loss (model, ``aux`` collection) and the
distillation terms (``trainers/dynamic_vit.py``) against numpy, and a few trainer steps."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import config_checks, losses, models
from vit_jax.trainers import common, dynamic_vit

TINY = dict(num_classes=10, image_size=16, patch_size=4, hidden_size=32, num_layers=3,
            num_heads=2, mlp_dim=64, head_zeroinit=False)


def test_keep_ratio_loss_is_the_papers_mse_of_each_stage():
  """ratio_weight / stages * sum_s mean_b (mean_n keep_s - rho**s)**2, from the marks
  the model sows, through the trainer's auxiliary-loss path."""
  model = models.create("vit_tiny_patch16_224", token_pruning=0.7,
                        token_pruning_layers=(1, 2), token_pruning_ratio_weight=3.0, **TINY)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  _, state = jax.jit(lambda v, x, rng: model.apply(
      v, x, train=True, rngs={"dropout": rng}, mutable=["intermediates", "aux"]))(
          variables, images, jax.random.key(2))
  _, aux_loss, metrics = common.split_auxiliary(state)
  inter = state["intermediates"]["Transformer"]
  expected, terms = 0.0, []
  for stage, block in enumerate((1, 2), start=1):
    keep = np.asarray(inter[f"encoderblock_{block}"]["keep_decision"][0], np.float64)
    assert keep.shape == (4, 16)
    term = np.mean((keep.mean(axis=1) - 0.7 ** stage) ** 2)
    terms.append(term)
    expected += 3.0 / 2 * term
    np.testing.assert_allclose(metrics[f"dynamic_vit/keep_ratio_encoderblock_{block}"],
                               keep.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics[f"dynamic_vit/ratio_loss_encoderblock_{block}"],
                               term, rtol=1e-5)
  assert min(terms) > 1e-4  # an untrained predictor misses the targets
  np.testing.assert_allclose(aux_loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["aux_loss"], expected, rtol=1e-5)
  assert not any(k.startswith("moe/") for k in metrics)


def test_distillation_terms_match_numpy():
  rng = np.random.default_rng(0)
  logits, teacher = rng.normal(size=(2, 3, 10)).astype(np.float32) * 3
  tokens, teacher_tokens = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  keep = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)

  def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)
                                                        ).sum(-1, keepdims=True))
  s, t = log_softmax(logits), log_softmax(teacher)
  kl = np.mean([sum(np.exp(t[b, c]) * (t[b, c] - s[b, c]) for c in range(10))
                for b in range(3)])
  np.testing.assert_allclose(losses.distillation_loss(logits, teacher, "soft", 1.0), kl,
                             rtol=1e-5)
  kept = [(tokens[b, n] - teacher_tokens[b, n]) ** 2 for b in range(3) for n in range(5)
          if keep[b, n]]
  np.testing.assert_allclose(dynamic_vit.token_mse(tokens, teacher_tokens, keep),
                             np.mean(kept), rtol=1e-5)
  assert float(dynamic_vit.token_mse(tokens, teacher_tokens, 0 * keep)) == 0.0
  # The decision carries no gradient; the student's tokens do.
  grad = jax.grad(lambda k, x: dynamic_vit.token_mse(x, teacher_tokens, k),
                  argnums=(0, 1))(jnp.asarray(keep), jnp.asarray(tokens))
  assert float(jnp.abs(grad[0]).max()) == 0.0 and float(jnp.abs(grad[1]).max()) > 0


def test_trainer_trains_dynamic_vit_and_lowers_the_ratio_loss(tfds_dir, tmp_path):
  """Six steps of the classification trainer with the keep-ratio loss and the
  distillation from the model itself without pruning: every term logged and finite,
  the ratio loss (weighted up, so six steps show it) falls. Two blocks, pruning
  before each: the smallest model with two stages (its compiles are the cost)."""
  from helpers import train_in_process  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  result = train_in_process(
      tfds_dir, tmp_path, "vit_tiny_patch16_224", steps=6, batch_size=16,
      learning_rate=5e-2,
      config_overrides={"log_every": 1, "dynamic_vit": ml_collections.ConfigDict(
          dict(distill_weight=0.5, teacher="self"))},
      image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
      token_pruning=0.9, token_pruning_layers=(0, 1), token_pruning_ratio_weight=50.0)
  assert result["step"] == 6 and np.isfinite(result["eval_loss"])
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()

  def series(tag):  # clu writes scalars as tensor summaries
    return np.array([float(tensor_util.make_ndarray(e.tensor_proto))
                     for e in acc.Tensors(tag)])
  tags = set(acc.Tags()["tensors"])
  for tag in ("train/aux_loss", "train/dynamic_vit/logit_kl", "train/dynamic_vit/token_mse",
              "train/dynamic_vit/keep_ratio_encoderblock_1"):
    assert tag in tags, (tag, sorted(tags))
    assert np.isfinite(series(tag)).all()
  ratio = series("train/dynamic_vit/ratio_loss_encoderblock_0") + series(
      "train/dynamic_vit/ratio_loss_encoderblock_1")
  assert len(ratio) == 6
  assert ratio[-2:].mean() < 0.5 * ratio[:2].mean(), ratio


@pytest.mark.parametrize("config, model, message", [
    ({"dynamic_vit": {"distill_weight": -0.5}}, None,
     r"config.dynamic_vit.distill_weight=-0.5: must be a finite number >= 0"),
    ({"model": {"token_pruning_ratio_weight": float("nan")}}, None,
     r"config.model.token_pruning_ratio_weight=nan: must be a finite number >= 0"),
    ({}, dict(token_pruning_ratio_weight=-1.0),
     r"token_pruning_ratio_weight must be a finite number >= 0, got -1.0"),
    ({}, dict(), r"distill_weight > 0 distils a DynamicViT: set config.model.token_pruning"),
])
def test_bad_settings_name_the_setting(config, model, message):
  if config:
    with pytest.raises(ValueError, match=message):
      config_checks.validate(ml_collections.ConfigDict(config))
    return
  vit = models.create("vit_tiny_patch16_224", **TINY, **model)
  with pytest.raises(ValueError, match=message):
    if model:
      jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    dynamic_vit.setup(ml_collections.ConfigDict(dict(distill_weight=0.5)), vit,
                      "vit_tiny_patch16_224", {}, 10, (1, 16, 16, 3), None)
