"""Swin v1: exact parameter counts, timm parity (logits and stage maps), shifted-window
masks, padding for other resolutions, errors, training through the real trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_timm_reference, state_dict_of, train_in_process
from random_variables import random_variables
from vit_jax import models
from vit_jax.models import convert, layers, swin

# timm 1.0.31: sum(p.numel()) of timm.create_model(name) built on the meta device
# (one-off script, outside the test process; 1000-class heads).
TIMM_PARAM_COUNTS = {
    "swin_tiny_patch4_window7_224": 28_288_354,
    "swin_small_patch4_window7_224": 49_606_258,
    "swin_base_patch4_window7_224": 87_768_224,
    "swin_base_patch4_window12_384": 87_903_584,
    "swin_large_patch4_window7_224": 196_532_476,
    "swin_large_patch4_window12_384": 196_735_516,
}

# A wiring-sized Swin: a 32x32 input gives 8x8 then 4x4 maps; window 4 so stage 0
# shifts (with a mask) and stage 1 (map == window) does not. Drop-path is on: calls
# without a "dropout" rng (evaluation) would fail if it were applied there.
TINY = dict(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
            window_size=4, num_classes=10, head_zeroinit=False, drop_path_rate=0.5)


def test_every_registered_swin_has_an_exact_count():
  assert sorted(models.list_models(family="swin")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


# Parity jobs: real widths, heads and windows, reduced depth (and resolution):
# - swin_tiny (window 7) built for 224 with timm's dynamic_img_size=True, fed 200x200:
#   maps 50, 25, 13, 7 are padded to multiples of 7 in every stage (and 25 is padded
#   to 26 by patch merging), stages 0-2 shift, stage 3 (7 == window) does not.
# - swin_base (window 12, heads 4/8/16/32) built for 96x96: maps 24, 12, 6, 3, so
#   stage 0's second block shifts (by 6, masked) and later stages use map-sized
#   windows without shifts.
RNG = np.random.RandomState(0)
JOBS = {
    "tiny_200": dict(
        name="swin_tiny_patch4_window7_224", ours=dict(depths=(2, 2, 2, 2), num_classes=10),
        images=RNG.randn(2, 200, 200, 3).astype(np.float32),
        timm=dict(depths=[2, 2, 2, 2], num_classes=10, dynamic_img_size=True)),
    "base_96": dict(
        name="swin_base_patch4_window12_384", ours=dict(depths=(2, 1, 1, 1), image_size=96),
        images=RNG.randn(2, 96, 96, 3).astype(np.float32),
        timm=dict(depths=[2, 1, 1, 1], img_size=96)),
}


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  """Every timm run of this module, in one subprocess (random weights, scale 0.05)."""
  jobs = [{"model": job["name"], "kwargs": job["timm"], "images": job["images"],
           "randomize": 0.05, "intermediates": True,
           "one_pass": True} for job in JOBS.values()]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_swin"))
  return dict(zip(JOBS, outputs))


@pytest.mark.parametrize("key", sorted(JOBS))
def test_matches_timm_logits_and_stage_maps(timm_outputs, key):
  job, ref = JOBS[key], timm_outputs[key]
  model = models.create(job["name"], **job["ours"])
  params = convert.from_timm(job["name"], state_dict_of(ref), model=model)
  assert models.param_count(job["name"], **job["ours"]) == int(ref["num_params"])
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(
      model, {"params": p}, x))(params, job["images"])
  assert 0.3 < np.abs(ref["logits"]).mean() < 3  # logits of order 1
  print(f"{key}: max |logit diff| {np.abs(logits - ref['logits']).max():.2e}")
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(4):
    expected = ref[f"intermediates/{i}"].transpose(0, 2, 3, 1)  # timm gives NCHW
    print(f"  stage_{i}: max |diff| {np.abs(inter[f'stage_{i}'] - expected).max():.2e}")
    np.testing.assert_allclose(inter[f"stage_{i}"], expected, atol=1e-4, rtol=1e-4,
                               err_msg=f"stage_{i}")
  # forward_features is the normed last map; our features are its spatial mean.
  np.testing.assert_allclose(inter["features"], ref["features"].mean(axis=(1, 2)),
                             atol=1e-4, rtol=1e-4)


def test_conversion_names_bad_keys(timm_outputs):
  job = JOBS["base_96"]
  state = state_dict_of(timm_outputs["base_96"])
  state["layers.1.blocks.0.attn.extra"] = np.zeros(3)
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected: layers\.1\.blocks\.0\.attn\.extra"):
    convert.from_timm(job["name"], state, **job["ours"])
  del state["layers.1.blocks.0.attn.extra"]
  del state["layers.2.downsample.reduction.weight"]
  with pytest.raises(convert.ConversionError,
                     match=r"no entry 'layers\.2\.downsample\.reduction\.weight'"):
    convert.from_timm(job["name"], state, **job["ours"])
  # A table for another window size is a shape mismatch that names the parameter.
  state = state_dict_of(timm_outputs["base_96"])
  with pytest.raises(convert.ConversionError,
                     match=r"stages_0/blocks_0/relative_position_bias/"
                           r"relative_position_bias_table: expected \(169, 4\), "
                           r"found \(529, 4\)"):
    convert.from_timm(job["name"], state, **{**job["ours"], "window_size": 7})


def test_shifted_window_mask_matches_regions():
  # 8x8 map, window 4, shift 2: the rolled map has regions split at rows/cols 4 and 6.
  mask = swin.shifted_window_mask((8, 8), (4, 4), (2, 2))
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any()  # the top-left window holds one region only
  # Window 3 (bottom-right) holds four regions: 2x2 quadrants of the window.
  region = lambda p: (p // 4 >= 2) * 2 + (p % 4 >= 2)
  expected = np.array([[0.0 if region(p) == region(q) else -100.0 for q in range(16)]
                       for p in range(16)])
  np.testing.assert_array_equal(mask[3], expected)
  # Windows 1 and 2 split along one axis only.
  assert len(np.unique(mask[1], axis=0)) == 2 and len(np.unique(mask[2], axis=0)) == 2


def test_relative_position_index_is_swins():
  index = layers.relative_position_index((2, 3))
  # Query (0, 0) against key (1, 2): offset (-1, -2), the first table row.
  assert index[0, 5] == 0
  # Query (1, 2) against key (0, 0): offset (1, 2), the last of (2*2-1)*(2*3-1) rows.
  assert index[5, 0] == 3 * 5 - 1
  assert (np.diag(index) == (2 - 1) * 5 + (3 - 1)).all()


def test_stage_windows_follow_timm():
  # 224: maps 56/28/14/7 with window 7; the last stage does not shift.
  assert swin.stage_windows((56, 56), (7, 7), 4) == [
      ((7, 7), (3, 3)), ((7, 7), (3, 3)), ((7, 7), (3, 3)), ((7, 7), (0, 0))]
  # A map smaller than the window becomes the window (no shift).
  assert swin.stage_windows((24, 10), (12, 12), 2) == [((12, 10), (6, 0)),
                                                      ((12, 5), (0, 0))]


@pytest.fixture(scope="module")
def tiny():
  model = models.create("swin_tiny_patch4_window7_224", **TINY)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return model, random_variables(model, images), images


def test_other_resolutions_pad_to_the_window_and_bad_sizes_fail(tiny):
  model, variables, _ = tiny
  # 36x44: maps 9x11 (padded to 12x12 for window 4) then 5x6; same weights.
  logits = jax.jit(model.apply)(variables, jnp.ones((1, 36, 44, 3)))
  assert logits.shape == (1, 10) and np.all(np.isfinite(logits))
  with pytest.raises(ValueError, match="needs image sides divisible by 4; got 30x32"):
    model.apply(variables, jnp.zeros((1, 30, 32, 3)))


def test_trains(tfds_dir, tmp_path):
  # 16x16 digits, patch 4: a 4x4 map (window 2, shifted with a mask), then 2x2.
  result = train_in_process(tfds_dir, tmp_path / "swin", "swin_tiny_patch4_window7_224",
                            steps=40, learning_rate=3e-3, input_size=16, image_size=16,
                            patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                            window_size=2, drop_path_rate=0.1)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.1, losses
