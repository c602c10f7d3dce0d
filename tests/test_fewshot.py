"""Few-shot (closed-form ridge) and linear-probe evaluators."""

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from vit_jax import models
from vit_jax.data import input_pipeline, preprocess
from vit_jax.evaluators import fewshot


@pytest.fixture(scope="module")
def digits():
  """Raw 8x8 pixels as features: a representation that is good, not perfect."""
  x, y = load_digits(return_X_y=True)
  x = x.astype(np.float32)
  return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def test_ridge_is_the_closed_form_solution(digits):
  (x, y), _ = digits
  x, y = x[:200], y[:200]
  predict = fewshot.ridge_classifier(x, y, 10, l2_reg=3.0)
  z = (x - x.mean(0)) / (x.std(0) + 1e-5)
  z = np.concatenate([z, np.ones((len(z), 1))], 1).astype(np.float64)
  t = 2 * np.eye(10)[y] - 1
  w = np.linalg.solve(z.T @ z + 3.0 * np.eye(z.shape[1]), z.T @ t)
  np.testing.assert_allclose(predict(x), z @ w, atol=2e-3, rtol=0)


def test_fewshot_accuracy_grows_with_shots(digits):
  # Measured on raw pixels: 1-shot 0.49, 10-shot 0.78 (chance 0.10).
  acc = fewshot.fewshot_accuracy(*digits, 10, shots=(1, 10), l2_reg=1.0)
  assert acc[10] > 0.6, acc
  assert acc[10] > acc[1], acc
  with pytest.raises(ValueError, match="fewer than 500 shots"):
    fewshot.fewshot_accuracy(*digits, 10, shots=(500,))


def test_linear_probe(digits):
  # Measured: 0.886 on the last 360 digits (other writers than the training ones).
  assert fewshot.linear_probe(*digits, 10, steps=300) > 0.8


def test_extract_features_from_a_model(tfds_dir):
  model = models.create("vit_tiny_patch16_224", image_size=16, patch_size=4,
                        hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                        num_classes=0)
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  builder = input_pipeline.get_builder("digits", tfds_dir)
  feats, labels = fewshot.extract_features(
      lambda v, x: model.apply(v, x), variables, builder, "test",
      preprocess_fn=preprocess.parse("decode|resize(16)|value_range(-1, 1)"),
      batch_size=128)
  assert feats.shape == (360, 32) and labels.shape == (360,)
  assert sorted(set(labels.tolist())) == list(range(10))
