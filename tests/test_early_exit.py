"""Early exits: the exit rule and the evaluator's curve against hand and numpy
computations; plain and LGViT exit heads on the ViT's sown block tokens; the per-exit
cost (the truncated model's plus the heads'); the tool's two stages resumed, the
backbone frozen in stage 2."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cheap_compiles as cheap_compiles_module
from vit_jax import models
from vit_jax.evaluators import early_exit as evaluator
from vit_jax.models import early_exit
from vit_jax.tools import benchmark

cheap_compiles = cheap_compiles_module.cheap_compiles  # autouse: cheaper XLA compiles

TINY = dict(num_classes=10, image_size=16, patch_size=4, hidden_size=32, num_layers=3,
            num_heads=2, mlp_dim=64)


def test_exit_rule_and_curve():
  # 2 exits + final, 3 images, 2 classes.
  probs = np.array([
      [[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]],   # exit 0
      [[0.2, 0.8], [0.95, 0.05], [0.7, 0.3]],  # exit 1
      [[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]],   # final
  ])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))  # softmax gives probs back
  labels = np.array([0, 0, 1])
  np.testing.assert_array_equal(evaluator.exit_decisions(logits, [0.85, 0.55, 1.01]),
                                [[0, 1, 2], [0, 0, 1], [2, 2, 2]])
  gflops = [1.0, 2.0, 4.0]
  sums = evaluator.curve_sums(logits, labels, np.ones(3, bool), (0.85, 0.55, 1.01), gflops)
  rows = evaluator.curve(sums, (0.85, 0.55, 1.01))["curve"]
  # 0.85: exit0 right, exit1 right, final right; cost (1 + 2 + 4) / 3.
  assert rows[0]["accuracy"] == pytest.approx(1.0)
  assert rows[0]["gflops"] == pytest.approx(7 / 3)
  # 0.55: exit0 right, exit0 right, exit1 says 0 (wrong); cost (1 + 1 + 2) / 3.
  assert rows[1]["accuracy"] == pytest.approx(2 / 3)
  assert rows[1]["gflops"] == pytest.approx(4 / 3)
  assert rows[2]["gflops"] == pytest.approx(4.0)
  np.testing.assert_allclose(rows[1]["exit_share"], [2 / 3, 1 / 3, 0])
  with pytest.raises(ValueError, match="exit_layers"):
    early_exit.check_exit_layers([1, 2], num_layers=3)  # 2 is the last block
  with pytest.raises(ValueError, match="exit_heads"):
    early_exit.check_exit_heads(["local", "lgvit"], (0, 1))


def test_evaluator_curve_equals_numpy():
  """Summed over two batches with padding, against a loop over images in numpy."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 40, 10)).astype(np.float32) * 3  # 3 exits + final
  labels = rng.integers(0, 10, size=40)
  mask = np.arange(40) < 33  # the last 7: padding
  thresholds, gflops = (0.3, 0.5, 0.7, 0.9, 1.01), (0.5, 1.0, 1.5, 2.25)
  step = jax.jit(evaluator.curve_sums, static_argnums=(3, 4))
  halves = [step(logits[:, s], labels[s], mask[s], thresholds, gflops)
            for s in (slice(0, 20), slice(20, 40))]
  got = evaluator.curve(jax.tree.map(jnp.add, *halves), thresholds)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  for t, row in zip(thresholds, got["curve"]):
    hits, cost, share = 0, 0.0, np.zeros(4)
    for b in range(33):
      k = next((e for e in range(3) if probs[e, b].max() >= t), 3)
      hits += probs[k, b].argmax() == labels[b]
      cost += gflops[k]
      share[k] += 1
    assert row["accuracy"] == pytest.approx(hits / 33, abs=1e-9)
    assert row["gflops"] == pytest.approx(cost / 33, rel=1e-6)
    np.testing.assert_allclose(row["exit_share"], share / 33)
  np.testing.assert_allclose(got["exit_accuracy"],
                             (probs[:, :33].argmax(-1) == labels[:33]).mean(-1))
  assert got["count"] == 33


@pytest.fixture(scope="module")
def tiny():
  """A 3-block ViT, two images and their block tokens."""
  model = models.create("vit_tiny_patch16_224", **TINY)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  logits, inter = models.forward_intermediates(model, variables, images)
  return model, variables, images, logits, inter


def test_lgvit_heads_shapes_and_params(tiny, monkeypatch):
  tokens = early_exit.block_tokens(tiny[4], (0, 1))
  heads = early_exit.ExitHeads((0, 1), 10, kinds=("local", "global"), num_heads=2)
  params = jax.jit(heads.init)(jax.random.key(2), tokens)["params"]
  d, c = 32, 10
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  # local: LayerNorm, pointwise, 3x3 depthwise, pointwise; then LayerNorm and Dense.
  assert count(params["exit_0_local"]) == 2 * d + (d * d + d) + (9 * d + d) + (d * d + d)
  assert params["exit_0_local"]["depthwise"]["kernel"].shape == (3, 3, 1, d)
  # global: LayerNorm, then MAPHead (probe, q/k/v/out, LayerNorm, a 4x MLP).
  assert count(params["exit_1_global"]) == d + 4 * (d * d + d) + 2 * d + (
      d * 4 * d + 4 * d) + (4 * d * d + d)
  for i in (0, 1):
    assert count(params[f"exit_{i}_norm"]) == 2 * d
    assert count(params[f"exit_{i}_head"]) == d * c + c
  params = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), params)
  apply = jax.jit(heads.apply)
  out = apply({"params": params}, tokens)
  assert out.shape == (2, 2, 10) and out.dtype == jnp.float32
  # The local head sees the 4x4 patch grid (shuffling the patches changes its output);
  # the global head's attention pooling does not (the same output, up to rounding).
  perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(16)])
  out_shuffled = apply({"params": params}, {i: t[:, perm] for i, t in tokens.items()})
  assert not np.allclose(out_shuffled[0], out[0], atol=1e-3)
  np.testing.assert_allclose(out_shuffled[1], out[1], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="square token grid"):
    heads.apply({"params": params}, {0: tokens[0][:, :-1], 1: tokens[1]})
  # Each head's cost counts in the exits': leaving later costs the earlier heads too
  # (the truncated models' costs faked here: tiny compiles still cost seconds).
  hg = early_exit.head_gflops(heads, jax.eval_shape(lambda: tokens))
  assert hg[0] > 9 * 16 * 32 * 2e-9 and hg[1] > 2 * 32 * 128 * 2e-9  # conv, MLP MACs
  monkeypatch.setattr(benchmark, "forward_gflops_per_image",
                      lambda name, **s: 10.0 * s["num_layers"])
  np.testing.assert_allclose(early_exit.exit_gflops("any", (0, 1), hg, num_layers=3),
                             [10 + hg[0], 20 + sum(hg), 30 + sum(hg)])


def test_exit_heads_read_the_sown_block_tokens(tiny):
  model, variables, images, logits, inter = tiny
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
  del logits


def test_two_stages_resume_freeze_and_evaluate(digits_pretrained, tmp_path, capsys,
                                                  monkeypatch):
  """Each stage of the tool's recipe cut back to its step-2 checkpoint (what a kill
  right after that save leaves) and rerun ends with the same params and Adam state as
  the uninterrupted run (state and input position resume exactly). Stage 1 (backbone
  and LGViT heads end to end) moves every backbone array; stage 2 trains the exits
  alone: the backbone comes out bit-identical and is not in its checkpoints. The tool's
  evaluator then covers the whole test split."""
  from resume_check import assert_same_state  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import early_exit as tool  # pylint: disable=g-import-not-at-top
  exit_run = tool.load(digits_pretrained[0], (0, 2), exit_heads=("local", "global"))

  def straight_and_resumed(subdir, **settings):
    straight = tool.train(exit_run, output_dir=str(tmp_path / "a"), **settings)
    a, b = tmp_path / "a" / "early_exit" / subdir, tmp_path / "b" / "early_exit" / subdir
    assert sorted(os.listdir(a / "checkpoints")) == ["2", "4"]
    shutil.copytree(a / "checkpoints", b / "checkpoints")
    shutil.rmtree(b / "checkpoints" / "4")
    capsys.readouterr()
    resumed = tool.train(exit_run, output_dir=str(tmp_path / "b"), **settings)
    assert "resumed from" in capsys.readouterr().out
    assert assert_same_state(a, b, 4) > 0
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    return straight

  common = dict(steps=4, batch_size=8, learning_rate=3e-3, checkpoint_every=2)
  stage1 = straight_and_resumed("stage1", stage=1, backbone_learning_rate=1e-3,
                                exit_weights=(0.5, 1.0), **common)
  moved = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)),
                                       stage1["backbone"], exit_run.variables["params"]))
  assert all(moved)  # stage 1 trains every backbone array

  backbone = stage1["backbone"]
  before = jax.tree.map(np.array, backbone)
  heads = straight_and_resumed(".", stage=2, backbone_params=backbone,
                               head_params=stage1["exits"], **common)
  jax.tree.map(np.testing.assert_array_equal, backbone, before)
  saved = checkpoint.load_state_arrays(str(tmp_path / "a" / "early_exit" / "checkpoints" / "4"))
  assert sorted(saved["params"]) == sorted(stage1["exits"])  # no backbone array trained
  assert any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), heads,
                                          stage1["exits"])))
  # The truncated models' costs faked (their compiles cost seconds; tested above).
  monkeypatch.setattr(benchmark, "forward_gflops_per_image",
                      lambda name, **s: 10.0 * s["num_layers"])
  result = tool.evaluate(exit_run, backbone, heads, (0.0, 1.01))
  assert result["count"] == 360 and len(result["gflops"]) == 3
  assert result["curve"][0]["exit_share"] == [1.0, 0.0, 0.0]  # threshold 0: all at exit 0
  assert result["curve"][0]["accuracy"] == pytest.approx(result["exit_accuracy"][0])
  assert result["curve"][1]["accuracy"] == pytest.approx(result["exit_accuracy"][-1])
  assert result["curve"][1]["gflops"] == pytest.approx(result["gflops"][-1])
