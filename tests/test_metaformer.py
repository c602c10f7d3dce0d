"""MetaFormer family (PoolFormer v1/v2, ConvFormer, CAFormer): counts, timm parity, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_timm_reference, state_dict_of, train_in_process
from vit_jax import models
from vit_jax.models import convert

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), models
# built on the meta device in a one-off script (1000-class heads, 224x224).
TIMM_PARAM_COUNTS = {
    "poolformer_s12": 11_915_176,
    "poolformer_s24": 21_388_968,
    "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520,
    "poolformer_m48": 73_473_448,
    "poolformerv2_s12": 11_891_712,
    "poolformerv2_s24": 21_341_464,
    "poolformerv2_s36": 30_791_216,
    "poolformerv2_m36": 56_077_168,
    "poolformerv2_m48": 73_346_056,
    "convformer_s18": 26_774_448,
    "convformer_s36": 40_012_152,
    "convformer_m36": 57_051_640,
    "convformer_b36": 99_882_616,
    "caformer_s18": 26_341_656,
    "caformer_s36": 39_297_102,
    "caformer_m36": 56_204_878,
    "caformer_b36": 98_753_614,
}

# Parity cases: (timm name, blocks kept per stage, image side, randomize scale).
# Depth is cut to keep CPU compiles short; widths and heads are the real ones. The
# random-weight scale keeps the logits of order 1: at 0.1 a CAFormer's attention
# saturates and timm's own float32 logits differ from its float64 ones by ~1e-4.
PARITY = [
    ("poolformer_s12", (1, 1, 2, 1), 64, 0.1),    # v1: GroupNorm, GELU, layer scale
    ("poolformerv2_m36", (1, 1, 2, 1), 64, 0.1),  # v2: StarReLU, res scale, M widths
    ("convformer_s18", (1, 1, 2, 1), 64, 0.1),    # separable-conv mixer, MLP head
    ("caformer_m36", (1, 1, 2, 1), 64, 0.05),     # attention in stages 3-4
]
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  """All timm reference runs of this module, in one subprocess."""
  rng = np.random.RandomState(0)
  jobs = [{"model": name, "kwargs": {"num_classes": NUM_CLASSES}, "stage_depths": depths,
           "images": rng.randn(2, size, size, 3).astype(np.float32), "randomize": scale,
           "intermediates": True} for name, depths, size, scale in PARITY]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_metaformer"))
  return [dict(out, images=job["images"]) for out, job in zip(outputs, jobs)]


def test_every_registered_metaformer_has_an_exact_count():
  assert sorted(models.list_models(family="metaformer")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize("case", range(len(PARITY)), ids=[p[0] for p in PARITY])
def test_matches_timm_with_random_weights(timm_outputs, case):
  """Logits and every stage's map equal timm's (float32, eval, random weights)."""
  name, depths, _, _ = PARITY[case]
  ref = timm_outputs[case]
  model = models.create(name, num_classes=NUM_CLASSES, depths=depths)
  params = convert.from_timm(name, state_dict_of(ref), model=model)
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(
      model, {"params": p}, x))(params, ref["images"])
  assert 0.3 < np.abs(ref["logits"]).mean() < 30  # logits of order 1
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(4):
    expected = ref[f"intermediates/{i}"].transpose(0, 2, 3, 1)  # timm maps are NCHW
    scale = np.abs(expected).max()
    np.testing.assert_allclose(inter[f"stage_{i}"] / scale, expected / scale, atol=1e-5,
                               rtol=0, err_msg=f"stage {i}")
  np.testing.assert_allclose(inter["stage_3"], ref["features"].transpose(0, 2, 3, 1),
                             atol=1e-4 * np.abs(ref["features"]).max(), rtol=0)
  if not model.mlp_head:  # the sown features are the head's input
    head = params["head"]
    np.testing.assert_allclose(inter["features"] @ head["kernel"] + head["bias"], logits,
                               atol=1e-4)


def test_timm_conversion_names_bad_keys(timm_outputs):
  name, depths, _, _ = PARITY[3]
  state = state_dict_of(timm_outputs[3])
  kwargs = dict(num_classes=NUM_CLASSES, depths=depths)
  state["stages.0.blocks.0.extra"] = np.zeros(3)
  with pytest.raises(convert.ConversionError, match="unexpected: stages.0.blocks.0.extra"):
    convert.from_timm(name, state, **kwargs)
  del state["stages.0.blocks.0.extra"]
  with pytest.raises(convert.ConversionError,
                     match=r"shape mismatch: head/fc2/bias: expected \(5,\), found \(10,\)"):
    convert.from_timm(name, state, **{**kwargs, "num_classes": 5})
  del state["stages.2.blocks.1.token_mixer.qkv.weight"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'stages.2.blocks.1.token_mixer.qkv.weight'"):
    convert.from_timm(name, state, **kwargs)


TINY = dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 64), num_classes=NUM_CLASSES,
            token_mixers=("pooling", "sepconv", "attention", "attention"))


def test_bad_inputs():
  with pytest.raises(ValueError, match="at least 3 pixels; got 2x32"):
    jax.eval_shape(models.create("caformer_s18", **TINY).init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 2, 32, 3), jnp.float32))
  with pytest.raises(ValueError, match="unknown token mixer 'conv'"):
    jax.eval_shape(models.create("caformer_s18", **{**TINY, "token_mixers": "conv"}).init,
                   jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_trains(tfds_dir, tmp_path):
  """A two-stage MetaFormer (separable conv, then attention), stochastic depth on:
  the loss falls. The model is small because XLA's CPU compile of the trainer's init
  and step grows with the number of parameters; steps are cheap."""
  result = train_in_process(
      tfds_dir, tmp_path, "caformer_s18", steps=100, input_size=32, learning_rate=3e-3,
      depths=(1, 1), dims=(16, 32), token_mixers=("sepconv", "attention"),
      res_scale_init=(None, 1.0), drop_path_rate=0.1)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.2, losses
