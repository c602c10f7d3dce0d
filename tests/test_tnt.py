"""TNT family: exact parameter counts, timm parity, errors, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import state_dict_of, train_in_process
from vit_jax import models
from vit_jax.models import convert

# plain_timm_outputs: one timm subprocess for DeiT, CrossViT and TNT (a plugin, so
# that the session fixture is shared by the three modules).
pytest_plugins = ["plain_timm"]

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), models built
# on the meta device in a one-off script (1000-class heads).
TIMM_PARAM_COUNTS = {
    "tnt_s_patch16_224": 23_768_584,
    "tnt_b_patch16_224": 65_428_680,
}


def assert_features_close(ours, ref):
  """Block features: float32 round-off grows with the residual stream's scale (|x| ~ 30
  at base width with random weights), so the 1e-4 bound is relative to the largest."""
  ref = np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=max(1e-4, 1e-5 * np.abs(ref).max()))


def test_every_registered_tnt_has_an_exact_count():
  assert sorted(models.list_models(family="tnt")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


# Parity jobs: real widths and heads (inner and outer), fewer blocks, 32x32 inputs (2x2
# patches of 16x16 pixels, each a 4x4 grid of pixel tokens).
PARITY = [("tnt_s_patch16_224", 2), ("tnt_b_patch16_224", 1)]


def timm_jobs():
  """Input images and timm jobs (run with DeiT's and CrossViT's, see plain_timm.py)."""
  images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  jobs = [{"model": name, "kwargs": dict(depth=depth, img_size=32, num_classes=10),
           "images": images, "randomize": 0.1, "intermediates": True}
          for name, depth in PARITY]
  return images, jobs


@pytest.fixture(scope="module")
def timm_outputs(plain_timm_outputs):
  return plain_timm_outputs["tnt"]


@pytest.mark.parametrize("index", range(len(PARITY)))
def test_matches_timm_with_random_weights(timm_outputs, index):
  images, outputs = timm_outputs
  name, depth = PARITY[index]
  ref = outputs[index]
  overrides = dict(image_size=32, num_layers=depth, num_classes=10)
  model = models.create(name, **overrides)
  params = convert.from_timm(name, state_dict_of(ref), model=model)
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(model, p, x))(
      {"params": params}, images)
  assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(depth):  # timm: patch tokens (no class token) as NCHW maps
    ours = inter[f"block_{i}"][:, 1:].reshape(2, 2, 2, -1).transpose(0, 3, 1, 2)
    assert_features_close(ours, ref[f"intermediates/{i}"])
  assert_features_close(inter["features"], ref["features"][:, 0])
  assert models.param_count(name, **overrides) == int(ref["num_params"])


def test_timm_conversion_names_bad_keys(timm_outputs):
  _, outputs = timm_outputs
  state = state_dict_of(outputs[0])
  overrides = dict(image_size=32, num_layers=2, num_classes=10)
  state["blocks.0.proj.bias"] = np.zeros(384, np.float32)  # TNT's block proj has none
  with pytest.raises(convert.ConversionError, match="unexpected: blocks.0.proj.bias"):
    convert.from_timm("tnt_s_patch16_224", state, **overrides)
  del state["blocks.0.proj.bias"], state["pixel_pos"]
  with pytest.raises(convert.ConversionError, match="no entry 'pixel_pos'"):
    convert.from_timm("tnt_s_patch16_224", state, **overrides)


def test_input_size_errors():
  model = models.create("tnt_s_patch16_224", image_size=32, num_layers=1)
  init = lambda shape: jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                                      jax.ShapeDtypeStruct(shape, jnp.float32))
  with pytest.raises(ValueError, match="built for 32x32 images; got 48x48"):
    init((1, 48, 48, 3))
  odd = models.create("tnt_s_patch16_224", image_size=40, num_layers=1)
  with pytest.raises(ValueError, match="divisible by 16; got 40x40"):
    jax.eval_shape(lambda x: odd.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 40, 40, 3), jnp.float32))


def test_trains(tfds_dir, tmp_path):
  result = train_in_process(
      tfds_dir, tmp_path, "tnt_s_patch16_224", steps=30, learning_rate=3e-3,
      image_size=16, patch_size=8, hidden_size=32, inner_dim=8, num_layers=1,
      inner_heads=2, outer_heads=2)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.2, losses
