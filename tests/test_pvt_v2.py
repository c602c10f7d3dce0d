"""PVT v2: exact counts, timm parity (logits and stage maps), input sizes, training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import intermediate_shapes, run_timm_reference, state_dict_of, train_in_process
from vit_jax import models
from vit_jax.models import convert, pvt_v2

# timm's sum(p.numel()) for each registered name with its 1000-class head (timm 1.0.31,
# timm.create_model(name) under `with torch.device("meta")`, in a one-off script).
TIMM_PARAM_COUNTS = {
    "pvt_v2_b0": 3_666_760,
    "pvt_v2_b1": 14_009_000,
    "pvt_v2_b2": 25_362_856,
    "pvt_v2_b3": 45_238_696,
    "pvt_v2_b4": 62_556_072,
    "pvt_v2_b5": 81_956_008,
    "pvt_v2_b2_li": 22_553_512,
}

# Parity jobs: each variant's real widths, heads, MLP and SR ratios (and linear SRA for
# b2_li), with one block per stage instead of the full depth (compiling the full
# models on a 2-core CPU takes minutes). The odd, non-square inputs exercise what a
# 224 input would not: SR convs that drop a remainder (16x20 -> 2x2 for sr 8) and
# adaptive 7x7 pooling with overlapping bins (18x15) and repeated inputs (3x2).
SHALLOW = dict(depths=(1, 1, 1, 1))
PARITY = {
    "pvt_v2_b0": (2, 61, 77),
    "pvt_v2_b2_li": (2, 70, 58),
}
TINY = dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4),
            num_classes=10)
# For the tests that compile.
TWO_STAGES = dict(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                  sr_ratios=(2, 1), mlp_ratios=(4, 4), num_classes=10)


@pytest.fixture(scope="module")
def timm_refs(tmp_path_factory):
  """One timm subprocess for the whole module: {name: (images, reference outputs)}."""
  rng = np.random.RandomState(0)
  images = {name: rng.randn(b, h, w, 3).astype(np.float32)
            for name, (b, h, w) in PARITY.items()}
  jobs = [{"model": name, "kwargs": SHALLOW, "images": images[name], "randomize": 0.1,
           "intermediates": True} for name in PARITY]
  outs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_pvt_v2"))
  return {name: (images[name], out) for name, out in zip(PARITY, outs)}


def test_every_registered_variant_has_an_exact_count():
  assert sorted(models.list_models(family="pvt_v2")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PARITY))
def test_matches_timm_logits_and_stage_maps(timm_refs, name):
  images, ref = timm_refs[name]
  # Stochastic depth is set and must not act in eval mode.
  model = models.create(name, drop_path_rate=0.3, **SHALLOW)
  assert models.param_count(name, **SHALLOW) == int(ref["num_params"])
  params = convert.from_timm(name, state_dict_of(ref), model=model)
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(
      model, {"params": p}, x))(params, images)
  assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1, not ~0
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(4):
    expected = ref[f"intermediates/{i}"].transpose(0, 2, 3, 1)  # timm maps are NCHW
    assert inter[f"stage_{i}"].shape == expected.shape
    np.testing.assert_allclose(inter[f"stage_{i}"], expected, atol=1e-4, rtol=0,
                               err_msg=f"stage_{i}")
  np.testing.assert_allclose(inter["features"], ref["features"].mean(axis=(2, 3)),
                             atol=1e-4, rtol=0)


def test_timm_conversion_names_bad_keys(timm_refs):
  state = state_dict_of(timm_refs["pvt_v2_b0"][1])
  state["stages.0.blocks.0.attn.extra"] = np.zeros(3)
  with pytest.raises(convert.ConversionError,
                     match="unexpected: stages.0.blocks.0.attn.extra"):
    convert.from_timm("pvt_v2_b0", state, **SHALLOW)
  del state["stages.0.blocks.0.attn.extra"]
  del state["stages.2.blocks.0.attn.sr.weight"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'stages.2.blocks.0.attn.sr.weight'"):
    convert.from_timm("pvt_v2_b0", state, **SHALLOW)
  # The reference has 1000 classes; a 10-class model is a shape mismatch named as such.
  state = state_dict_of(timm_refs["pvt_v2_b0"][1])
  with pytest.raises(convert.ConversionError, match=r"shape mismatch: head/bias"):
    convert.from_timm("pvt_v2_b0", state, num_classes=10, **SHALLOW)


def test_adaptive_pool_matches_pytorch_bins():
  # PyTorch AdaptiveAvgPool1d(3) of 5 inputs: bins [0,1], [1,2,3], [3,4].
  np.testing.assert_allclose(pvt_v2.adaptive_pool_matrix(5, 3), [
      [1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
  # Upsampling repeats inputs: 2 -> 4 gives x0, x0, x1, x1.
  np.testing.assert_allclose(pvt_v2.adaptive_pool_matrix(2, 4),
                             [[1, 0], [1, 0], [0, 1], [0, 1]])


def test_input_sizes_and_the_sr_constraint():
  model = models.create("pvt_v2_b0", **TINY)
  logits, inter = intermediate_shapes(model, (2, 224, 160, 3))
  assert logits == (2, 10)
  assert [inter[f"stage_{i}"] for i in range(4)] == [
      (2, 56, 40, 8), (2, 28, 20, 16), (2, 14, 10, 24), (2, 7, 5, 32)]
  assert inter["features"] == (2, 32)
  # 29 is the smallest side whose stage-0 map (ceil(29 / 4) = 8) fits the 8x8 reduction.
  assert intermediate_shapes(model, (1, 29, 29, 3))[0] == (1, 10)
  with pytest.raises(ValueError, match=r"stage 0 reduces keys/values with a 8x8 stride-8 "
                                       r"conv, so its map must be at least 8x8; a 28x64 "
                                       r"input gives 7x16"):
    intermediate_shapes(model, (1, 28, 64, 3))
  # Linear SRA pools to 7x7 from any size.
  linear = models.create("pvt_v2_b2_li", **TINY)
  assert intermediate_shapes(linear, (1, 8, 12, 3))[1]["stage_3"] == (1, 1, 1, 32)


def test_parameter_layout():
  variables = jax.eval_shape(
      lambda: models.create("pvt_v2_b2_li", **TINY).init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  flat = {"/".join(str(k.key) for k in path): x.shape for path, x in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  block = "stages_1/blocks_0"
  assert flat["patch_embed/proj/kernel"] == (7, 7, 3, 8)
  assert flat["stages_1/downsample/proj/kernel"] == (3, 3, 8, 16)
  assert flat[f"{block}/sr/conv/kernel"] == (1, 1, 16, 16)  # linear SRA: 1x1 conv
  assert flat[f"{block}/attn/key/kernel"] == (16, 2, 8)
  assert flat[f"{block}/mlp/dwconv/kernel"] == (3, 3, 1, 128)
  assert flat["stages_3/norm/scale"] == (32,) and flat["head/kernel"] == (32, 10)


def random_variables(model, shape, seed=0):
  """Random parameters without compiling the initialisers (slow to jit on CPU)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape) * 0.2, x.dtype), abstract)


def test_trains(tfds_dir, tmp_path):
  """A two-stage tiny PVT v2 trains through the real trainer: the loss falls."""
  result = train_in_process(
      tfds_dir, tmp_path / "pvt_v2", "pvt_v2_b0", steps=40, learning_rate=1e-2,
      input_size=16, **TWO_STAGES)  # 16x16 inputs: maps 4x4 (keys 2x2), then 2x2
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0], losses
  # Held-out loss well below ln(10) = 2.303, the loss of the near-uniform initial logits.
  assert result["eval_loss"] < math.log(10) - 0.1, result
