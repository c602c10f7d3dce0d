"""CSWin: exact official parameter counts, parity with a PyTorch re-creation of the
official forward, cross-shaped stripe attention and LePE against direct computations,
sizes, official-checkpoint conversion, training.

CSWin is not in timm. ``tests/cswin_official_ref.py`` re-creates
microsoft/CSWin-Transformer's ``models/cswin.py`` (same state-dict names and float32
arithmetic; while developing it gave bit-identical outputs to the official file at
224x224); it runs in one subprocess for the whole module (``official_ref.py``)
with random weights. The block test below also recomputes a whole CSWin block (norm,
qkv, both stripe directions, LePE, projection, MLP) stripe by stripe in float64 NumPy,
written from the paper and the official code without sharing any of the model's code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from helpers import (assert_matches_reference, intermediate_shapes, run_timm_reference,
                     state_dict_of, train_in_process)
from vit_jax import models
from vit_jax.models import convert, cswin, official

# The official implementation's sum(p.numel()): microsoft/CSWin-Transformer
# models/cswin.py with each registered function's configuration, 1000-class head
# (checked below on the re-creation, built on the meta device). Cross-check
# for CSWin-T by hand: a block of width d has 12 d^2 + 23 d parameters (LePE convs:
# 10 d), merges 18 d^2 + 6 d, stem 9,600, head 513,000 -> 22,320,552. The paper
# rounds these to 23M, 35M, 78M and 173M (tiny, small, base, large).
OFFICIAL_PARAM_COUNTS = {
    "cswin_tiny_224": 22_320_552,
    "cswin_small_224": 34_643_304,
    "cswin_base_224": 77_382_184,
    "cswin_large_224": 173_262_664,
    "cswin_base_384": 77_382_184,
    "cswin_large_384": 173_262_664,
}

TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), num_classes=10)
# Parity with the official forward: cswin_tiny_224's widths, heads and stripe widths
# (1, 2, 7, 7), one block per stage, at 224x224 (the official model's only input size).
PARITY = dict(depths=(1, 1, 1, 1), num_classes=10)


def random_variables(model, shape, seed=0, scale=0.2):
  """Random parameters without compiling the initialisers (slow to jit on CPU)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * scale, x.dtype),
                      abstract)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One torch subprocess: the re-creation's counts and the parity outputs."""
  model = models.create("cswin_tiny_224", **PARITY)
  config = dict(img_size=224, embed_dim=model.embed_dim, depth=list(model.depths),
                split_size=list(model.split_sizes), num_heads=list(model.num_heads),
                num_classes=model.num_classes)
  images = np.random.RandomState(0).randn(2, 224, 224, 3)
  jobs = [{"family": "cswin", "counts": True},
          {"family": "cswin", "config": config, "images": images, "randomize": 0.05}]
  counts, out = run_timm_reference(jobs, tmp_path_factory.mktemp("cswin_ref"),
                                   script="official_ref.py")
  return counts, out, images


def test_every_registered_variant_has_an_exact_count(reference):
  assert sorted(models.list_models(family="cswin")) == sorted(OFFICIAL_PARAM_COUNTS)
  # The re-creation, built with the official configurations, has the same counts.
  assert {k.split("/")[1]: int(v) for k, v in reference[0].items()} == OFFICIAL_PARAM_COUNTS


def test_matches_the_official_forward(reference):
  """Logits, features and every stage map within 1e-4 of the official forward."""
  _, out, images = reference
  params = official.from_official("cswin_tiny_224", state_dict_of(out), **PARITY)
  model = models.create("cswin_tiny_224", **PARITY)
  logits, inter = jax.jit(lambda v, x: models.forward_intermediates(model, v, x))(
      {"params": params}, np.asarray(images, np.float32))
  assert_matches_reference(out, logits, inter, label="cswin_tiny_224")


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == OFFICIAL_PARAM_COUNTS[name]


# ------------------------------------------------------------ direct computations


def _layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _depthwise_3x3(x, p):
  """Zero-padded 3x3 depth-wise conv of one ``[B, h, w, C]`` window, by its definition."""
  _, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.broadcast_to(p["bias"], x.shape).copy()
  for dy in range(3):
    for dx in range(3):
      out += padded[:, dy:dy + h, dx:dx + w] * p["kernel"][dy, dx, 0]
  return out


def direct_block(p, x, num_heads, stripe, branches):
  """One CSWin block, stripe by stripe, in float64 NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  batch, height, width, dim = x.shape
  qkv = _layer_norm(x, p["norm1"]) @ p["qkv"]["kernel"] + p["qkv"]["bias"]
  q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
  part, heads = dim // branches, num_heads // branches
  head_dim = part // heads
  attended = np.zeros_like(x)
  for b in range(branches):
    if branches == 1:
      win_h, win_w = height, width
    else:  # first half of the channels: vertical stripes; second: horizontal
      win_h, win_w = (height, stripe) if b == 0 else (stripe, width)
    chans = slice(b * part, (b + 1) * part)
    for top in range(0, height, win_h):
      for left in range(0, width, win_w):
        rows, cols = slice(top, top + win_h), slice(left, left + win_w)
        tokens = lambda t: t[:, rows, cols, chans].reshape(batch, -1, heads, head_dim)
        logits = np.einsum("bqhd,bkhd->bhqk", tokens(q), tokens(k)) / math.sqrt(head_dim)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", weights, tokens(v))
        attended[:, rows, cols, chans] = (
            out.reshape(batch, win_h, win_w, part)
            + _depthwise_3x3(v[:, rows, cols, chans], p[f"lepe_{b}"]))
  x = x + attended @ p["proj"]["kernel"] + p["proj"]["bias"]
  mlp = p["mlp"]
  h = _layer_norm(x, p["norm2"]) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
  h = 0.5 * h * (1 + special.erf(h / math.sqrt(2)))  # exact GELU
  return x + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


@pytest.mark.parametrize("height,width,stripe,branches", [
    (6, 4, 2, 2),   # non-square map: 2 vertical (6x2) and 3 horizontal (2x4) stripes
    (4, 6, 1, 2),   # width-1 stripes (stage 0 of every official model)
    (3, 5, 7, 1),   # the last stage: one global branch with all heads
])
def test_block_matches_direct_stripe_computation(height, width, stripe, branches):
  # Stochastic depth is set and must not act in eval mode.
  block = cswin.CSWinBlock(num_heads=4, split_size=stripe, branches=branches,
                           drop_path_rate=0.5)
  x = np.random.RandomState(1).randn(2, height, width, 16)
  variables = random_variables(block, x.shape, scale=0.3)
  out = jax.jit(block.apply)(variables, jnp.asarray(x, jnp.float32))
  expected = direct_block(variables["params"], x, 4, stripe, branches)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_lepe_is_a_depthwise_conv_inside_each_stripe():
  rng = np.random.RandomState(2)
  value = rng.randn(2, 6, 4, 5).astype(np.float32)
  conv_params = {"kernel": rng.randn(3, 3, 1, 5).astype(np.float32),
                 "bias": rng.randn(5).astype(np.float32)}
  conv = lambda x: jax.lax.conv_general_dilated(
      x, conv_params["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=5) + conv_params["bias"]
  # Whole-map window: exactly a depth-wise conv of the map.
  np.testing.assert_allclose(cswin.lepe(conv, value, (6, 4)), conv(value), atol=1e-5)
  # Vertical stripes of width 2: each stripe is convolved on its own (zero borders).
  out = np.asarray(cswin.lepe(conv, value, (6, 2)))
  for left in (0, 2):
    stripe = value[:, :, left:left + 2]
    np.testing.assert_allclose(out[:, :, left:left + 2],
                               _depthwise_3x3(stripe.astype(np.float64), conv_params),
                               atol=1e-5)
  # ...which differs from convolving the whole map (the stripe borders matter).
  assert not np.allclose(out, conv(value), atol=1e-3)


# ------------------------------------------------------------ model surface


def test_input_sizes_and_the_stripe_constraint():
  model = models.create("cswin_tiny_224", **TINY)
  logits, inter = intermediate_shapes(model, (2, 224, 336, 3))
  assert logits == (2, 10) and inter["features"] == (2, 64)
  assert [inter[f"stage_{i}"] for i in range(4)] == [
      (2, 56, 84, 8), (2, 28, 42, 16), (2, 14, 21, 32), (2, 7, 11, 64)]
  with pytest.raises(ValueError, match=r"stage 2 cuts its 12x12 feature map \(from a "
                                       r"192x192 input\) into stripes of width 7: both "
                                       r"sides must be multiples of 7.*multiples of 112"):
    intermediate_shapes(model, (1, 192, 192, 3))
  model_384 = models.create("cswin_base_384", **{**TINY, "num_heads": (2, 2, 2, 2)})
  assert intermediate_shapes(model_384, (1, 384, 192, 3))[1]["stage_3"] == (1, 12, 6, 64)
  with pytest.raises(ValueError, match="multiples of 192"):
    intermediate_shapes(model_384, (1, 224, 224, 3))
  with pytest.raises(ValueError, match="num_heads must be even, got 3"):
    intermediate_shapes(models.create("cswin_tiny_224", **{**TINY, "num_heads": (2, 3, 4, 4)}),
            (1, 224, 224, 3))


def test_parameter_layout():
  variables = jax.eval_shape(lambda: models.create("cswin_tiny_224", **TINY).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  flat = {"/".join(str(k.key) for k in path): x.shape for path, x in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  assert flat["patch_embed/proj/kernel"] == (7, 7, 3, 8)
  assert flat["stages_2/downsample/proj/kernel"] == (3, 3, 16, 32)
  assert flat["stages_2/blocks_0/qkv/kernel"] == (32, 96)
  assert flat["stages_2/blocks_0/lepe_0/kernel"] == (3, 3, 1, 16)
  assert flat["stages_2/blocks_0/lepe_1/kernel"] == (3, 3, 1, 16)
  assert flat["stages_3/blocks_0/lepe_0/kernel"] == (3, 3, 1, 64)  # one global branch
  assert "stages_3/blocks_0/lepe_1/kernel" not in flat
  assert flat["norm/scale"] == (64,) and flat["head/kernel"] == (64, 10)


def to_official(params, depths):
  """Our parameters in the official state-dict layout (the inverse of the converter)."""
  t = lambda a: np.asarray(a)
  linear = lambda p: {"weight": t(p["kernel"]).T, "bias": t(p["bias"])}
  conv = lambda p: {"weight": t(p["kernel"]).transpose(3, 2, 0, 1), "bias": t(p["bias"])}
  norm = lambda p: {"weight": t(p["scale"]), "bias": t(p["bias"])}
  tree = {"stage1_conv_embed.0": conv(params["patch_embed"]["proj"]),
          "stage1_conv_embed.2": norm(params["patch_embed"]["norm"]),
          "norm": norm(params["norm"]), "head": linear(params["head"])}
  for i, depth in enumerate(depths):
    stage = params[f"stages_{i}"]
    if i:
      tree[f"merge{i}.conv"] = conv(stage["downsample"]["proj"])
      tree[f"merge{i}.norm"] = norm(stage["downsample"]["norm"])
    for j in range(depth):
      block, p = stage[f"blocks_{j}"], f"stage{i + 1}.{j}"
      tree.update({f"{p}.norm1": norm(block["norm1"]), f"{p}.qkv": linear(block["qkv"]),
                   f"{p}.proj": linear(block["proj"]), f"{p}.norm2": norm(block["norm2"]),
                   f"{p}.mlp.fc1": linear(block["mlp"]["Dense_0"]),
                   f"{p}.mlp.fc2": linear(block["mlp"]["Dense_1"])})
      for b in range(2 if i < len(depths) - 1 else 1):
        tree[f"{p}.attns.{b}.get_v"] = conv(block[f"lepe_{b}"])
  return {f"{k}.{leaf}": v for k, d in tree.items() for leaf, v in d.items()}


def test_official_checkpoint_conversion():
  model = models.create("cswin_tiny_224", **TINY)
  params = random_variables(model, (1, 224, 224, 3))["params"]
  state = to_official(params, TINY["depths"])
  assert "stage4.0.attns.0.get_v.weight" in state and len(state) == 82
  converted = official.from_official("cswin_tiny_224", state, **TINY)
  jax.tree.map(np.testing.assert_array_equal, converted, params)
  state["stage2.0.attns.0.extra"] = np.zeros(2)
  with pytest.raises(convert.ConversionError, match="unexpected: stage2.0.attns.0.extra"):
    official.from_official("cswin_tiny_224", state, **TINY)
  del state["stage2.0.attns.0.extra"], state["stage3.0.attns.1.get_v.bias"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'stage3.0.attns.1.get_v.bias'"):
    official.from_official("cswin_tiny_224", state, **TINY)


# For the tests that compile: 16x16 inputs give a 4x4 map in width-2 stripes, then 2x2.
TWO_STAGES = dict(embed_dim=16, depths=(1, 1), num_heads=(2, 2), split_sizes=(2, 1),
                  num_classes=10)


def test_trains(tfds_dir, tmp_path):
  """A two-stage tiny CSWin trains through the real trainer: the loss falls."""
  result = train_in_process(
      tfds_dir, tmp_path / "cswin", "cswin_tiny_224", steps=40, learning_rate=1e-2,
      input_size=16, **TWO_STAGES)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0], losses
  # Held-out loss well below ln(10) = 2.303, the loss of the near-uniform initial logits.
  assert result["eval_loss"] < math.log(10) - 0.1, result
