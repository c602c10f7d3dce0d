"""CvT family: parameter counts of the official code, conv attention, BatchNorm, training.

CvT is not in timm and no reference model runs offline; the convolutional attention is
checked against a direct NumPy computation of the official ``Attention.forward``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import train_in_process
from vit_jax import models
from vit_jax.models import cvt

# Parameter counts of the official models (microsoft/CvT, lib/models/cls_cvt.py with the
# CvT-13/21/W24 specs: patch 7/3/3, stride 4/2/2, widths 64/192/384 (W24: 192/768/1024),
# depths 1/2/10, 1/4/16, 2/2/20, MLP ratio 4, qkv_bias, class token in stage 3,
# dw_bn projections), counted with a 1000-class head by hand from its constructors and
# with sum(p.numel()) over a torch re-build of the constructors' parameter-owning
# modules in a one-off script (both agree; every official parameter is trainable;
# BatchNorm running statistics are buffers). CvT-13 = 61,696 (stage 1) + 1,013,568
# (stage 2) + 18,536,448 (stage 3) + 768 (norm) + 385,000 (head) = 19,997,480, the
# paper's 20M; CvT-21 is 32M; the CvT-21 and W24 numbers also equal those printed by
# an independent port (lucid).
OFFICIAL_PARAM_COUNTS = {
    "cvt_13": 19_997_480,
    "cvt_21": 31_622_696,
    "cvt_w24": 277_196_392,
}
TINY = dict(hidden_sizes=(16, 24, 32), depths=(1, 1, 1), num_heads=(1, 2, 4),
            num_classes=10)


def test_every_registered_cvt_has_an_exact_count():
  assert sorted(models.list_models(family="cvt")) == sorted(OFFICIAL_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == OFFICIAL_PARAM_COUNTS[name]


def _conv_bn_reference(x, kernel, bn, stride):
  """Depthwise 3x3 conv (padding 1, no bias) + eval BatchNorm, NumPy, NHWC -> tokens."""
  batch, height, width, dim = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
  out = np.zeros((batch, out_h, out_w, dim))
  for y in range(out_h):
    for xx in range(out_w):
      window = padded[:, y * stride:y * stride + 3, xx * stride:xx * stride + 3]
      out[:, y, xx] = np.einsum("bijc,ijc->bc", window, kernel[:, :, 0])
  out = (out - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
  return out.reshape(batch, -1, dim)


def test_conv_attention_matches_the_official_computation():
  """Class token bypasses the convs; k/v are stride-2 maps; scale is dim ** -0.5."""
  dim, heads, height, width = 8, 2, 5, 4
  layer = cvt.ConvAttention(num_heads=heads, with_cls_token=True)
  rs = np.random.RandomState(0)
  x = rs.randn(2, 1 + height * width, dim).astype(np.float32)
  variables = jax.jit(layer.init, static_argnums=(2, 3))(
      jax.random.key(0), x, height, width)
  # Random weights and biases, and non-trivial BatchNorm statistics (variances > 0).
  randomize = lambda tree, scale, offset: jax.tree.map(
      lambda a: jnp.asarray(offset + scale * rs.randn(*a.shape), jnp.float32), tree)
  stats = variables["batch_stats"]
  variables = {"params": randomize(variables["params"], 0.3, 0.0),
               "batch_stats": {name: {"bn": {
                   "mean": randomize(stats[name]["bn"]["mean"], 0.3, 0.0),
                   "var": jnp.asarray(rs.rand(dim) + 0.5, jnp.float32)}}
                               for name in stats}}
  ours = jax.jit(layer.apply, static_argnums=(2, 3))(variables, x, height, width)

  p, s = jax.tree.map(np.asarray, variables["params"]), variables["batch_stats"]
  cls, spatial = x[:, :1], x[:, 1:].reshape(2, height, width, dim)

  def project(name, stride):
    bn = {"scale": p[f"conv_proj_{name}"]["bn"]["scale"],
          "bias": p[f"conv_proj_{name}"]["bn"]["bias"],
          "mean": np.asarray(s[f"conv_proj_{name}"]["bn"]["mean"]),
          "var": np.asarray(s[f"conv_proj_{name}"]["bn"]["var"])}
    y = _conv_bn_reference(spatial, p[f"conv_proj_{name}"]["conv"]["kernel"], bn, stride)
    y = np.concatenate([cls, y], axis=1)
    y = y @ p[f"proj_{name}"]["kernel"] + p[f"proj_{name}"]["bias"]
    return y.reshape(2, -1, heads, dim // heads).transpose(0, 2, 1, 3)

  q, k, v = project("q", 1), project("k", 2), project("v", 2)
  assert q.shape[2] == 1 + 20 and k.shape[2] == 1 + 3 * 2  # 5x4 map -> 3x2 for k, v
  logits = np.einsum("bhqd,bhkd->bhqk", q, k) * dim ** -0.5
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bhkd->bqhd", weights, v).reshape(2, -1, dim)
  expected = y @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_stages_batch_stats_and_features():
  model = models.create("cvt_13", **TINY)
  images = jax.random.normal(jax.random.key(1), (4, 64, 48, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert set(variables) == {"params", "batch_stats"}
  # One compile for eval (with intermediates) and a training forward of the same inputs.
  run = jax.jit(lambda v, x: (models.forward_intermediates(model, v, x),
                              model.apply(v, x, train=True, mutable=["batch_stats"])))
  (logits, inter), (out, updated) = run(variables, images)
  assert logits.shape == (4, 10)
  # Strides 4, 2, 2 with padding: 64x48 -> 16x12 -> 8x6 -> 4x3.
  assert [inter[f"stage_{s}"].shape for s in range(3)] == [
      (4, 16, 12, 16), (4, 8, 6, 24), (4, 4, 3, 32)]
  assert inter["features"].shape == (4, 32)
  assert "cls" in variables["params"]["stage2"] and "cls" not in variables["params"]["stage0"]

  # Training normalises with batch statistics and updates the running ones (momentum
  # 0.1 as PyTorch); eval uses the running statistics.
  bn = lambda v: v["batch_stats"]["stage0"]["block_0"]["attention"]["conv_proj_k"]["bn"]
  assert np.all(np.asarray(bn(variables)["mean"]) == 0)
  assert not np.allclose(bn(updated)["mean"], 0)
  assert not np.allclose(out, logits, atol=1e-4)
  (shifted, _), _ = run({**variables, "batch_stats": updated["batch_stats"]}, images)
  assert not np.allclose(shifted, logits, atol=1e-5)


def test_trains(tfds_dir, tmp_path):
  """Through the real trainer: BatchNorm statistics travel in the train state.

  One stage (token embedding, class token, a block with conv projections) keeps the
  compile cheap; the three-stage wiring is checked above.
  """
  one_stage = dict(hidden_sizes=(32,), depths=(1,), num_heads=(2,), patch_sizes=(3,),
                   patch_strides=(2,), patch_paddings=(1,), cls_token=(True,))
  result = train_in_process(tfds_dir, tmp_path, "cvt_13", steps=30, learning_rate=3e-3,
                            **one_stage)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.2, losses
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  state = checkpoint.load_state_arrays(str(checkpoint.latest_step_dir(str(tmp_path))))
  stats = state["model_state"]["batch_stats"]["stage0"]["block_0"]["attention"]
  assert not np.allclose(stats["conv_proj_q"]["bn"]["var"], 1.0)  # updated while training
