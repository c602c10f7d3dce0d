"""MixPro: the MaskMix mask and the progressive attention labels against a numpy
re-creation of the published rule; the class attention read from the model; a tiny
training run with it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import train_in_process
from vit_jax import finetune, models


def numpy_mask_mix(images, lam, noise, cell, patch):
  """MixPro's MaskMix: ceil(cells * lam) cells (a random permutation's first) keep
  the image, the rest come from the partner (here the batch reversed)."""
  b, h, w, _ = images.shape
  rows, cols = math.ceil(h / cell), math.ceil(w / cell)
  count = int(np.ceil(rows * cols * lam))
  grid = np.zeros((b, rows * cols), np.float32)
  for i in range(b):
    grid[i, np.argsort(noise[i])[:count]] = 1.0
  grid = grid.reshape(b, rows, cols)
  pixels = np.stack([np.kron(g, np.ones((cell, cell)))[:h, :w] for g in grid])[..., None]
  per = cell // patch
  patches = np.stack([np.kron(g, np.ones((per, per)))[:h // patch, :w // patch].ravel()
                      for g in grid])
  mixed = pixels * images + (1 - pixels) * images[::-1]
  return mixed, patches, count / (rows * cols)


@pytest.mark.parametrize("size,cell", [(16, 8), (20, 8), (16, 4)])
def test_mask_mix_equals_numpy(size, cell):
  images = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
  rng = jax.random.key(3)
  mixed, patch_mask, lam = jax.device_get(finetune.mask_mix(
      rng, jnp.asarray(images), alpha=1.0, cell=cell, patch_size=4))
  k_lam, k_perm = jax.random.split(rng)
  cells = math.ceil(size / cell) ** 2
  beta = float(jax.random.beta(k_lam, 1.0, 1.0))
  noise = np.asarray(jax.random.uniform(k_perm, (4, cells)))
  want_mixed, want_patches, want_lam = numpy_mask_mix(images, beta, noise, cell, 4)
  np.testing.assert_allclose(mixed, want_mixed, rtol=1e-6)
  np.testing.assert_array_equal(patch_mask, want_patches)
  np.testing.assert_allclose(lam, np.full(4, want_lam), rtol=1e-6)
  # Every patch comes whole from one image.
  assert patch_mask.shape == (4, (size // 4) ** 2)
  with pytest.raises(ValueError, match="mixpro_cell=6"):
    finetune.mask_mix(rng, jnp.asarray(images), alpha=1.0, cell=6, patch_size=4)


def test_attention_labels_equal_numpy():
  rng = np.random.default_rng(1)
  b, n, c = 4, 16, 5
  attention = rng.uniform(size=(b, n)).astype(np.float32)
  mask = (rng.uniform(size=(b, n)) < 0.5).astype(np.float32)
  area = np.full(b, mask.mean(), np.float32)
  probs = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
  labels = np.array([0, 3, 1, 4])
  targets, factor = jax.device_get(finetune.attention_labels(
      jnp.asarray(attention), jnp.asarray(mask), jnp.asarray(area), jnp.asarray(probs),
      jnp.asarray(labels), c, label_smoothing=0.1))

  onehot = np.eye(c)[labels] * 0.9 + 0.1 / c
  lam_attn = (mask * attention).sum(1) / attention.sum(1)
  area_targets = area[:, None] * onehot + (1 - area[:, None]) * onehot[::-1]
  cos = (probs * area_targets).sum(1) / (np.linalg.norm(probs, axis=1)
                                         * np.linalg.norm(area_targets, axis=1))
  want_factor = cos.mean()
  lam = want_factor * lam_attn + (1 - want_factor) * area
  np.testing.assert_allclose(factor, want_factor, rtol=1e-5)
  np.testing.assert_allclose(targets, lam[:, None] * onehot + (1 - lam[:, None])
                             * onehot[::-1], rtol=1e-5)


def test_class_attention_from_the_last_block():
  model = models.create("vit_tiny_patch16_224", num_classes=10, image_size=16,
                        patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), x)
  _, state = model.apply(variables, x, capture_intermediates=finetune.last_block_qk_filter(
      model), mutable=["intermediates"])
  attention = finetune.last_block_class_attention(state["intermediates"], model)
  # By hand from the block-0 tokens and the last block's own parameters.
  block = variables["params"]["Transformer"]["encoderblock_1"]
  tokens = state["intermediates"]["Transformer"]["block_0"][0]
  ln = block["LayerNorm_0"]
  y = (tokens - tokens.mean(-1, keepdims=True)) / jnp.sqrt(
      tokens.var(-1, keepdims=True) + 1e-6) * ln["scale"] + ln["bias"]
  att = block["MultiHeadDotProductAttention_1"]
  q = jnp.einsum("bnd,dhk->bnhk", y, att["query"]["kernel"]) + att["query"]["bias"]
  k = jnp.einsum("bnd,dhk->bnhk", y, att["key"]["kernel"]) + att["key"]["bias"]
  logits = jnp.einsum("bhk,bmhk->bhm", q[:, 0], k) / math.sqrt(q.shape[-1])
  want = jax.nn.softmax(logits, -1).mean(1)[:, 1:]
  np.testing.assert_allclose(attention, want, rtol=1e-4, atol=1e-6)


MIXPRO_RUN = dict(steps=4, image_size=16, patch_size=4, hidden_size=32, num_layers=2,
                 num_heads=2, mlp_dim=64, config_overrides={
                     "mixup.mixpro_alpha": 1.0, "mixup.mixpro_cell": 8,
                     "checkpoint_every": 2})


@pytest.fixture(scope="module")
def mixpro_run(tfds_dir, tmp_path_factory):
  """4 tiny steps with MixPro, checkpoints at 2 and 4: ``(workdir, result)``."""
  workdir = tmp_path_factory.mktemp("mixpro_run") / "run"
  return workdir, train_in_process(tfds_dir, workdir, "vit_tiny_patch16_224", **MIXPRO_RUN)


def test_training_with_mixpro(mixpro_run):
  _, result = mixpro_run
  assert result["step"] == 4
  assert all(np.isfinite(loss) for _, loss in result["train_loss_history"])


def test_mixpro_run_resumes_exactly(mixpro_run, tfds_dir, tmp_path, capsys):
  """Cut back to step 2 (a kill after that save), rerun: step 4 is bit-identical
  (MixPro's lam, cells and partner come from the step, not from a live generator)."""
  from resume_check import assert_same_state, cut_back  # pylint: disable=g-import-not-at-top
  workdir, result = mixpro_run
  killed = cut_back(workdir, tmp_path / "killed", 2)
  resumed = train_in_process(tfds_dir, killed, "vit_tiny_patch16_224", **MIXPRO_RUN)
  assert "/killed/checkpoints/2 (step 2)" in capsys.readouterr().out
  assert resumed["step"] == 4 and resumed["eval_loss"] == result["eval_loss"]
  assert assert_same_state(workdir, killed, 4) > 20
