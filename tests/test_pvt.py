"""PVT v1: exact official parameter counts, parity with a PyTorch re-creation of the
official forward, position embeddings at other sizes, errors, official-checkpoint
conversion, training.

PVT v1 is not in timm. ``tests/pvt_official_ref.py`` re-creates whai362/PVT's
``classification/pvt.py`` (same state-dict names and float32 arithmetic; while
developing it gave bit-identical outputs to the official file at 64x64 and 96x64); it
runs in one subprocess for the whole module (``official_ref.py``) with random
weights. Its spatial-reduction attention is PVT v2's
(``pvt_v2.spatial_reduction_attention``), which ``test_pvt_v2`` also checks against timm.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (assert_matches_reference, run_timm_reference, state_dict_of,
                     train_in_process)
from vit_jax import models
from vit_jax.models import convert, official, pvt

# The official implementation's sum(p.numel()): whai362/PVT classification/pvt.py with
# each registered function's configuration at 224x224 and a 1000-class head (checked
# below on the re-creation, built on the meta device); pvt_tiny also counted by hand
# (patch embeddings 858,112 + position embeddings 389,376 + blocks 11,467,264 + norm,
# class token and head 514,536). The paper: 13.2M, 24.5M, 44.2M, 61.4M.
OFFICIAL_PARAM_COUNTS = {
    "pvt_tiny": 13_229_288,
    "pvt_small": 24_485_864,
    "pvt_medium": 44_208_104,
    "pvt_large": 61_369_320,
}

TINY = dict(image_size=64, depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32),
            num_heads=(1, 2, 3, 4), num_classes=10)
# Two stages (strides 4 and 8), for the tests that compile: the class-token stage and
# one without it.
TWO_STAGES = dict(image_size=32, depths=(1, 1), embed_dims=(16, 32),
                  num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(4, 4), num_classes=10)


# Parity with the official forward: pvt_tiny's widths, heads, MLP and SR ratios, one
# block per stage, position embeddings learned at 64x64; run at 64x64 and at 96x64 (the
# embeddings resized bilinearly, as the official code does).
PARITY = dict(image_size=64, depths=(1, 1, 1, 1), num_classes=10)
PARITY_INPUTS = ((2, 64, 64, 3), (1, 96, 64, 3))


def random_variables(model, shape, seed=0, scale=0.2):
  """Random parameters without compiling the initialisers (slow to jit on CPU)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * scale, x.dtype),
                      abstract)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One torch subprocess: the re-creation's counts and the parity outputs."""
  model = models.create("pvt_tiny", **PARITY)
  config = dict(img_size=PARITY["image_size"], depths=list(PARITY["depths"]),
                embed_dims=list(model.embed_dims), num_heads=list(model.num_heads),
                mlp_ratios=list(model.mlp_ratios), sr_ratios=list(model.sr_ratios),
                num_classes=PARITY["num_classes"])
  rng = np.random.RandomState(0)
  jobs = [{"family": "pvt", "counts": True}] + [
      {"family": "pvt", "config": config, "images": rng.randn(*shape), "randomize": 0.05}
      for shape in PARITY_INPUTS]  # the same seed: the same weights for both inputs
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("pvt_ref"),
                               script="official_ref.py")
  return outputs[0], outputs[1:], [job["images"] for job in jobs[1:]]


def test_every_registered_variant_has_an_exact_count(reference):
  assert sorted(models.list_models(family="pvt")) == sorted(OFFICIAL_PARAM_COUNTS)
  # The re-creation, built with the official configurations, has the same counts.
  assert {k.split("/")[1]: int(v) for k, v in reference[0].items()} == OFFICIAL_PARAM_COUNTS


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == OFFICIAL_PARAM_COUNTS[name]


def test_matches_the_official_forward(reference):
  """Logits, features and stage maps within 1e-4, at the learned size and resized."""
  _, outputs, inputs = reference
  state = state_dict_of(outputs[0])
  assert all(np.array_equal(state[k], v) for k, v in state_dict_of(outputs[1]).items())
  params = official.from_official("pvt_tiny", state, **PARITY)
  model = models.create("pvt_tiny", **PARITY)
  run = jax.jit(lambda v, x: models.forward_intermediates(model, v, x))
  for out, images in zip(outputs, inputs):
    logits, inter = run({"params": params}, np.asarray(images, np.float32))
    assert_matches_reference(out, logits, inter, label=str(images.shape))


def test_bilinear_resize_is_pytorchs_align_corners_false():
  # 2 -> 4: samples at -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the edge).
  np.testing.assert_allclose(pvt.bilinear_resize_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  # 4 -> 2: samples at 0.5 and 2.5, no anti-aliasing.
  np.testing.assert_allclose(pvt.bilinear_resize_matrix(4, 2),
                             [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  # The same weights as JAX's own non-antialiased linear resize, up and down.
  for size_in, size_out in ((7, 10), (7, 3), (14, 9), (5, 5)):
    theirs = jax.image.resize(np.eye(size_in, dtype=np.float32), (size_out, size_in),
                              "linear", antialias=False)
    np.testing.assert_allclose(pvt.bilinear_resize_matrix(size_in, size_out), theirs,
                               atol=1e-6)
  grid = np.random.RandomState(0).randn(1, 35, 3).astype(np.float32)
  assert pvt.resize_pos_embed(grid, (7, 5), (7, 5)) is grid


def test_other_sizes_resize_the_position_embeddings():
  """At 48x32 a 32x32 model equals a 48x32 model holding the resized embeddings.

  The first model has stochastic depth, which must not act in eval mode.
  """
  model = models.create("pvt_tiny", drop_path_rate=0.5, **TWO_STAGES)
  variables = random_variables(model, (1, 32, 32, 3))
  images = jax.random.normal(jax.random.key(1), (2, 48, 32, 3))
  logits, inter = jax.jit(lambda v, x: models.forward_intermediates(model, v, x))(
      variables, images)
  assert inter["stage_0"].shape == (2, 12, 8, 16)
  assert inter["stage_1"].shape == (2, 6, 4, 32)  # the class token is not in the map

  native = models.create("pvt_tiny", **{**TWO_STAGES, "image_size": (48, 32)})
  params = jax.tree.map(lambda x: x, variables["params"])
  grids = {0: ((8, 8), (12, 8)), 1: ((4, 4), (6, 4))}
  pos = params["stages_0"]["pos_embed"]
  params["stages_0"]["pos_embed"] = pvt.resize_pos_embed(pos, *grids[0])
  pos = params["stages_1"]["pos_embed"]  # the class token's slot is kept as it is
  params["stages_1"]["pos_embed"] = jnp.concatenate(
      [pos[:, :1], pvt.resize_pos_embed(pos[:, 1:], *grids[1])], axis=1)
  expected = jax.jit(native.apply)({"params": params}, images)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  assert np.abs(logits).mean() > 0.1


def test_wrong_sizes_are_clear_errors():
  model = models.create("pvt_tiny", **TINY)
  with pytest.raises(ValueError, match=r"positive multiples of 32 \(patch embeddings of "
                                       r"strides 4, 2, 2, 2 without padding\); got 80x64"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 80, 64, 3)))
  with pytest.raises(ValueError, match="image_size=48 is not a multiple of 32"):
    jax.eval_shape(models.create("pvt_tiny", **{**TINY, "image_size": 48}).init,
                   jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_parameter_layout():
  variables = jax.eval_shape(lambda: models.create("pvt_tiny", **TINY).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  flat = {"/".join(str(k.key) for k in path): x.shape for path, x in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  assert flat["stages_0/patch_embed/proj/kernel"] == (4, 4, 3, 8)
  assert flat["stages_1/patch_embed/proj/kernel"] == (2, 2, 8, 16)
  assert flat["stages_0/pos_embed"] == (1, 256, 8)
  assert flat["stages_3/pos_embed"] == (1, 5, 32)  # 2x2 grid + the class token
  assert flat["stages_3/cls_token"] == (1, 1, 32)
  assert flat["stages_0/blocks_0/sr/conv/kernel"] == (8, 8, 8, 8)
  assert "stages_3/blocks_0/sr/conv/kernel" not in flat  # sr ratio 1
  assert flat["stages_2/blocks_0/attn/query/kernel"] == (24, 3, 8)
  assert flat["stages_2/blocks_0/mlp/Dense_0/kernel"] == (24, 96)
  assert flat["norm/scale"] == (32,) and flat["head/kernel"] == (32, 10)


def to_official(params, depths, sr_ratios):
  """Our parameters in the official state-dict layout (the inverse of the converter)."""
  t = lambda a: np.asarray(a)
  linear = lambda p: {"weight": t(p["kernel"]).T, "bias": t(p["bias"])}
  conv = lambda p: {"weight": t(p["kernel"]).transpose(3, 2, 0, 1), "bias": t(p["bias"])}
  norm = lambda p: {"weight": t(p["scale"]), "bias": t(p["bias"])}
  tree = {"norm": norm(params["norm"]), "head": linear(params["head"])}
  state = {"cls_token": t(params["stages_3"]["cls_token"])}
  for i, depth in enumerate(depths):
    stage, n = params[f"stages_{i}"], i + 1
    tree[f"patch_embed{n}.proj"] = conv(stage["patch_embed"]["proj"])
    tree[f"patch_embed{n}.norm"] = norm(stage["patch_embed"]["norm"])
    state[f"pos_embed{n}"] = t(stage["pos_embed"])
    for j in range(depth):
      block, p = stage[f"blocks_{j}"], f"block{n}.{j}"
      attn = block["attn"]
      dim = attn["query"]["kernel"].shape[0]
      flat_in = lambda a: t(a).reshape(dim, dim).T  # [dim, heads, head_dim] -> [out, in]
      tree[f"{p}.attn.q"] = {"weight": flat_in(attn["query"]["kernel"]),
                             "bias": t(attn["query"]["bias"]).reshape(-1)}
      tree[f"{p}.attn.kv"] = {
          "weight": np.concatenate([flat_in(attn["key"]["kernel"]),
                                    flat_in(attn["value"]["kernel"])]),
          "bias": np.concatenate([t(attn["key"]["bias"]).reshape(-1),
                                  t(attn["value"]["bias"]).reshape(-1)])}
      tree[f"{p}.attn.proj"] = {"weight": t(attn["out"]["kernel"]).reshape(dim, dim).T,
                                "bias": t(attn["out"]["bias"])}
      if sr_ratios[i] > 1:
        tree[f"{p}.attn.sr"] = conv(block["sr"]["conv"])
        tree[f"{p}.attn.norm"] = norm(block["sr"]["norm"])
      tree.update({f"{p}.norm1": norm(block["norm1"]), f"{p}.norm2": norm(block["norm2"]),
                   f"{p}.mlp.fc1": linear(block["mlp"]["Dense_0"]),
                   f"{p}.mlp.fc2": linear(block["mlp"]["Dense_1"])})
  state.update({f"{k}.{leaf}": v for k, d in tree.items() for leaf, v in d.items()})
  return state


def test_official_checkpoint_conversion():
  model = models.create("pvt_tiny", **TINY)
  params = random_variables(model, (1, 64, 64, 3))["params"]
  state = to_official(params, TINY["depths"], model.sr_ratios)
  assert state["block3.0.attn.kv.weight"].shape == (48, 24)
  converted = official.from_official("pvt_tiny", state, **TINY)
  jax.tree.map(np.testing.assert_array_equal, converted, params)
  del state["pos_embed2"]
  with pytest.raises(convert.ConversionError, match="no entry 'pos_embed2'"):
    official.from_official("pvt_tiny", state, **TINY)
  with pytest.raises(convert.ConversionError, match="no official-checkpoint converter "
                                                    "for the 'pvt_v2' family"):
    official.from_official("pvt_v2_b0", state)


def test_trains(tfds_dir, tmp_path):
  """A two-stage tiny PVT trains through the real trainer: the loss falls.

  Slower to start than PVT v2 or CSWin (hence the lower learning rate): the class
  token joins only at the last stage and, at initialisation, sees the map through
  near-uniform attention.
  """
  result = train_in_process(
      tfds_dir, tmp_path / "pvt", "pvt_tiny", steps=40, learning_rate=3e-3,
      input_size=16, **{**TWO_STAGES, "image_size": 16})  # maps 4x4, 2x2 + class
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0], losses
  # Held-out loss well below ln(10) = 2.303, the loss of the near-uniform initial logits.
  assert result["eval_loss"] < math.log(10) - 0.1, result
