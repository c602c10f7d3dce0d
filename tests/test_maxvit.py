"""MaxViT (timm maxvit_*_tf_224): exact parameter counts, timm parity (logits and stage
maps, BatchNorm statistics included), partition-size errors, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_timm_reference, state_dict_of, train_in_process
from random_variables import random_variables
from vit_jax import models
from vit_jax.models import convert

# timm 1.0.31: sum(p.numel()) of timm.create_model(name) built on the meta device
# (one-off script, outside the test process; 1000-class heads). MaxViT-T and -B are
# the paper's 30.92M and 119.47M.
TIMM_PARAM_COUNTS = {
    "maxvit_tiny_tf_224": 30_916_528,
    "maxvit_small_tf_224": 68_927_956,
    "maxvit_base_tf_224": 119_467_708,
    "maxvit_large_tf_224": 211_785_560,
}

# Wiring-sized: 32x32 input -> stem 16x16 -> stage maps 8x8 and 4x4, 2x2 partitions.
# Drop-path is on: calls without a "dropout" rng (evaluation) would fail if it were
# applied there.
TINY = dict(image_size=32, window_size=2, stem_width=8, embed_dims=(16, 32),
            depths=(1, 1), dim_head=8, head_hidden_size=16, num_classes=10,
            head_zeroinit=False, drop_path_rate=0.5)


def test_every_registered_maxvit_has_an_exact_count():
  assert sorted(models.list_models(family="maxvit")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


# Parity jobs: real widths, heads (dim_head 32), stems and heads, reduced depth:
# - maxvit_tiny_tf_224 at 224: the real 7x7 block windows and 7x7 grid, maps 56..7.
# - maxvit_base_tf_224 built for 96x96 (timm img_size=96, so 3x3 partitions; maps
#   24, 12, 6, 3), one stage with two blocks.
RNG = np.random.RandomState(0)
JOBS = {
    "tiny_224": dict(
        name="maxvit_tiny_tf_224", ours=dict(depths=(1, 1, 1, 1), num_classes=10),
        images=RNG.randn(2, 224, 224, 3).astype(np.float32),
        timm=dict(depths=[1, 1, 1, 1], num_classes=10)),
    "base_96": dict(
        name="maxvit_base_tf_224", ours=dict(depths=(1, 2, 1, 1), image_size=96),
        images=RNG.randn(2, 96, 96, 3).astype(np.float32),
        timm=dict(depths=[1, 2, 1, 1], img_size=96)),
}


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  """Every timm run of this module, in one subprocess (random weights and BatchNorm
  statistics, scale 0.05)."""
  jobs = [{"model": job["name"], "kwargs": job["timm"], "images": job["images"],
           "randomize": 0.05, "intermediates": True,
           "one_pass": True} for job in JOBS.values()]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_maxvit"))
  return dict(zip(JOBS, outputs))


@pytest.mark.parametrize("key", sorted(JOBS))
def test_matches_timm_logits_and_stage_maps(timm_outputs, key):
  job, ref = JOBS[key], timm_outputs[key]
  model = models.create(job["name"], **job["ours"])
  variables = convert.variables_from_timm(job["name"], state_dict_of(ref), model=model)
  assert sorted(variables) == ["batch_stats", "params"]
  assert models.param_count(job["name"], **job["ours"]) == int(ref["num_params"])
  logits, inter = jax.jit(lambda v, x: models.forward_intermediates(model, v, x))(
      variables, job["images"])
  assert 0.3 < np.abs(ref["logits"]).mean() < 3  # logits of order 1
  print(f"{key}: max |logit diff| {np.abs(logits - ref['logits']).max():.2e}")
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(4):  # timm's index 0 is the stem
    expected = ref[f"intermediates/{i + 1}"].transpose(0, 2, 3, 1)
    print(f"  stage_{i}: max |diff| {np.abs(inter[f'stage_{i}'] - expected).max():.2e}")
    np.testing.assert_allclose(inter[f"stage_{i}"], expected, atol=1e-4, rtol=1e-4,
                               err_msg=f"stage_{i}")


def test_conversion_names_bad_keys_and_needs_batch_stats(timm_outputs):
  job = JOBS["base_96"]
  state = state_dict_of(timm_outputs["base_96"])
  with pytest.raises(convert.ConversionError,
                     match=r"also keeps batch_stats: use convert\.variables_from_timm"):
    convert.from_timm(job["name"], state, **job["ours"])
  del state["stages.1.blocks.1.conv.norm2.running_var"]
  with pytest.raises(convert.ConversionError,
                     match=r"no entry 'stages\.1\.blocks\.1\.conv\.norm2\.running_var'"):
    convert.variables_from_timm(job["name"], state, **job["ours"])
  state = state_dict_of(timm_outputs["base_96"])
  state["stages.0.blocks.0.attn_grid.extra"] = np.zeros(2)
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected: stages\.0\.blocks\.0\.attn_grid\.extra"):
    convert.variables_from_timm(job["name"], state, **job["ours"])


@pytest.fixture(scope="module")
def tiny():
  model = models.create("maxvit_tiny_tf_224", **TINY)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return model, random_variables(model, images), images


def test_input_sizes_must_fit_the_partitions(tiny):
  model, variables, _ = tiny
  # 64x64: maps 16x16 and 8x8, both divisible by 2.
  assert jax.jit(model.apply)(variables, jnp.ones((1, 64, 64, 3))).shape == (1, 10)
  with pytest.raises(ValueError, match=r"divisible by 2x2; a 32x40 input gives stage "
                                       r"maps 8x10, 4x5\. Use sides that are multiples "
                                       r"of 64x64"):
    model.apply(variables, jnp.zeros((1, 32, 40, 3)))
  # The registered models: 7x7 partitions at 224.
  with pytest.raises(ValueError, match=r"divisible by 7x7; a 256x256 input"):
    models.create("maxvit_tiny_tf_224").stage_sizes(256, 256)


def test_trains(tfds_dir, tmp_path):
  # 16x16 digits, one stage: stem 8x8, a 4x4 map with 2x2 windows and a 2x2 grid.
  result = train_in_process(tfds_dir, tmp_path / "maxvit", "maxvit_tiny_tf_224",
                            steps=40, learning_rate=3e-3, input_size=16, image_size=16,
                            window_size=2, stem_width=16, embed_dims=(32,), depths=(1,),
                            dim_head=16, head_hidden_size=32, drop_path_rate=0.1)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.1, losses
