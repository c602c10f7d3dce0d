"""Few-shot linear classification and a linear probe on frozen features.

* ``fewshot_accuracy``: big_vision's few-shot protocol. Take ``shots`` training
  examples per class, standardise the features with their statistics, and fit a
  linear map with a bias to targets in {-1, +1} by regularised least squares in
  closed form, ``W = (X^T X + l2 I)^-1 X^T Y`` (no training loop, seconds for any
  backbone); report top-1 on the test features.
* ``linear_probe``: softmax regression on all training features (full batch, Adam,
  weight decay), the standard "linear evaluation" of a representation.
* ``extract_features``: the pooled pre-logits features of a model over a split
  (build the model with ``num_classes=0``).
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.data import input_pipeline


def extract_features(predict_fn: Callable, variables: Any, builder, split: str, *,
                     preprocess_fn: Callable, batch_size: int = 256
                     ) -> tuple[np.ndarray, np.ndarray]:
  """``(features [n, d], labels [n])`` of ``predict_fn(variables, images)`` on a split."""
  dataset, _ = input_pipeline.make_eval_dataset(
      builder, split, preprocess_fn=preprocess_fn, batch_size=batch_size, cache=False)
  apply = jax.jit(predict_fn)
  feats, labels = [], []
  for batch in input_pipeline.numpy_batches(dataset):
    keep = batch["_mask"].astype(bool)
    feats.append(np.asarray(apply(variables, batch["image"]))[keep])
    labels.append(batch["label"][keep])
  return np.concatenate(feats), np.concatenate(labels)


def select_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int = 0
                 ) -> np.ndarray:
  """Indices of ``shots`` random examples of every class (an error if one has fewer)."""
  rng = np.random.RandomState(seed)
  picked = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise ValueError(f"class {c} has {len(idx)} training examples, fewer than "
                       f"{shots} shots")
    picked.append(rng.choice(idx, shots, replace=False))
  return np.concatenate(picked)


@jax.jit
def _ridge_fit(x: jax.Array, y: jax.Array, l2_reg: float):
  mean, std = x.mean(0), x.std(0) + 1e-5
  x = jnp.concatenate([(x - mean) / std, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  gram = x.T @ x + l2_reg * jnp.eye(x.shape[1], dtype=x.dtype)
  w = jnp.linalg.solve(gram, x.T @ y)
  return w, mean, std


def ridge_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float):
  """Returns ``predict(x_test) -> logits`` of the closed-form least-squares classifier."""
  x = jnp.asarray(x, jnp.float32)
  targets = 2.0 * jax.nn.one_hot(jnp.asarray(y), num_classes) - 1.0
  w, mean, std = _ridge_fit(x, targets, jnp.float32(l2_reg))

  def predict(x_test):
    x_test = (jnp.asarray(x_test, jnp.float32) - mean) / std
    return x_test @ w[:-1] + w[-1]

  return predict


def fewshot_accuracy(train: tuple[np.ndarray, np.ndarray],
                     test: tuple[np.ndarray, np.ndarray], num_classes: int, *,
                     shots: Sequence[int] = (1, 5, 10), l2_reg: float = 2.0 ** 10,
                     seed: int = 0) -> dict[int, float]:
  """``{shots: test top-1}`` of the closed-form few-shot classifier."""
  (x, y), (x_test, y_test) = train, test
  out = {}
  for n in shots:
    idx = select_shots(y, n, num_classes, seed)
    predict = ridge_classifier(x[idx], y[idx], num_classes, l2_reg)
    out[n] = float(np.mean(np.argmax(np.asarray(predict(x_test)), -1) == y_test))
  return out


def linear_probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 num_classes: int, *, steps: int = 500, learning_rate: float = 0.01,
                 weight_decay: float = 1e-4) -> float:
  """Test top-1 of softmax regression on standardised frozen features."""
  (x, y), (x_test, y_test) = train, test
  mean, std = x.mean(0), x.std(0) + 1e-5
  x = jnp.asarray((x - mean) / std, jnp.float32)
  x_test = jnp.asarray((x_test - mean) / std, jnp.float32)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

  @jax.jit
  def train_loop(params):
    def step(carry, _):
      p, s = carry
      grads = jax.grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  params = train_loop(params)
  pred = jnp.argmax(x_test @ params["w"] + params["b"], -1)
  return float(jnp.mean(pred == jnp.asarray(y_test)))
