"""Early exits: the exit rule and the curve against a hand computation; exit heads on
the ViT's sown block tokens; the per-exit cost is the truncated model's."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import early_exit

TINY = dict(num_classes=10, image_size=16, patch_size=4, hidden_size=32, num_layers=3,
            num_heads=2, mlp_dim=64)


def test_exit_rule_and_curve():
  # 2 exits + final, 3 images, 2 classes.
  probs = np.array([
      [[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]],   # exit 0
      [[0.2, 0.8], [0.95, 0.05], [0.7, 0.3]],  # exit 1
      [[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]],   # final
  ])
  labels = np.array([0, 0, 1])
  np.testing.assert_array_equal(early_exit.exit_decisions(probs, 0.85), [0, 1, 2])
  np.testing.assert_array_equal(early_exit.exit_decisions(probs, 0.6), [0, 0, 1])
  np.testing.assert_array_equal(early_exit.exit_decisions(probs, 1.01), [2, 2, 2])
  rows = early_exit.threshold_curve(probs, labels, [1.0, 2.0, 4.0], [0.85, 0.6, 1.01])
  # 0.85: exit0 right, exit1 right, final right; cost (1 + 2 + 4) / 3.
  assert rows[0]["accuracy"] == pytest.approx(1.0)
  assert rows[0]["gflops"] == pytest.approx(7 / 3)
  # 0.6: exit0 right, exit0 right, exit1 says 0 (wrong); cost (1 + 1 + 2) / 3.
  assert rows[1]["accuracy"] == pytest.approx(2 / 3)
  assert rows[1]["gflops"] == pytest.approx(4 / 3)
  assert rows[2]["gflops"] == pytest.approx(4.0)
  np.testing.assert_allclose(rows[1]["exit_share"], [2 / 3, 1 / 3, 0])
  with pytest.raises(ValueError, match="exit_layers"):
    early_exit.check_exit_layers([1, 2], num_layers=3)  # 2 is the last block


def test_exit_heads_read_the_sown_block_tokens():
  model = models.create("vit_tiny_patch16_224", **TINY)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), images)
  logits, inter = models.forward_intermediates(model, variables, images)
  tokens = early_exit.block_tokens(inter, (0, 1))
  heads = early_exit.ExitHeads((0, 1), 10)
  params = heads.init(jax.random.key(2), tokens)
  params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), params)
  out = heads.apply(params, tokens)
  assert out.shape == (2, 2, 10)
  # Exit 0 is LayerNorm + Dense on the class token after block 0, by hand:
  x = tokens[0][:, 0]
  p = params["params"]
  norm = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
  norm = norm * p["exit_0_norm"]["scale"] + p["exit_0_norm"]["bias"]
  expected = norm @ p["exit_0_head"]["kernel"] + p["exit_0_head"]["bias"]
  np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-4)
  # The truncated model reproduces block 1's tokens: its cost is an exit's.
  short = models.create("vit_tiny_patch16_224", **{**TINY, "num_layers": 2})
  short_vars = {"params": {k: v for k, v in variables["params"].items()}}
  short_vars["params"]["Transformer"] = {
      k: v for k, v in variables["params"]["Transformer"].items()
      if k != "encoderblock_2"}
  _, short_inter = models.forward_intermediates(short, short_vars, images)
  np.testing.assert_allclose(short_inter["Transformer/block_1"], tokens[1], rtol=1e-6)
  costs = early_exit.exit_gflops("vit_tiny_patch16_224", (0, 1), **TINY)
  assert costs[0] < costs[1] < costs[2]
  del logits


def test_exit_heads_resume_bit_identical(digits_pretrained, tmp_path, capsys):
  """The tool's exit-head training cut back to its step-2 checkpoint (what a kill right
  after that save leaves) and rerun ends with the same params and Adam state as the
  uninterrupted run: the state and the input position both resume exactly."""
  from resume_check import assert_same_state  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import early_exit as tool  # pylint: disable=g-import-not-at-top
  exit_run = tool.load(digits_pretrained[0], (1,))
  settings = dict(steps=4, batch_size=16, learning_rate=3e-3, checkpoint_every=2)
  straight = tool.train(exit_run, output_dir=str(tmp_path / "a"), **settings)
  a, b = tmp_path / "a" / "early_exit", tmp_path / "b" / "early_exit"
  assert sorted(os.listdir(a / "checkpoints")) == ["2", "4"]
  shutil.copytree(a, b)
  shutil.rmtree(b / "checkpoints" / "4")
  capsys.readouterr()
  resumed = tool.train(exit_run, output_dir=str(tmp_path / "b"), **settings)
  assert "resumed from" in capsys.readouterr().out
  assert assert_same_state(a, b, 4) > 0
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
