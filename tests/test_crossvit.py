"""CrossViT family: exact parameter counts, timm parity (incl. the dagger stem), training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import state_dict_of, train_in_process
from vit_jax import models
from vit_jax.models import convert, crossvit

# plain_timm_outputs: one timm subprocess for DeiT, CrossViT and TNT (a plugin, so
# that the session fixture is shared by the three modules).
pytest_plugins = ["plain_timm"]

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), models built
# on the meta device in a one-off script (1000-class heads, default resolution).
TIMM_PARAM_COUNTS = {
    "crossvit_tiny_240": 7_014_800,
    "crossvit_small_240": 26_856_272,
    "crossvit_base_240": 105_025_232,
    "crossvit_9_240": 8_553_296,
    "crossvit_15_240": 27_528_464,
    "crossvit_18_240": 43_271_408,
    "crossvit_9_dagger_240": 8_776_592,
    "crossvit_15_dagger_240": 28_209_008,
    "crossvit_18_dagger_240": 44_266_976,
    "crossvit_15_dagger_408": 28_500_080,
    "crossvit_18_dagger_408": 44_606_560,
}


def assert_features_close(ours, ref):
  """Block features: float32 round-off grows with the residual stream's scale (|x| ~ 30
  at base width with random weights), so the 1e-4 bound is relative to the largest."""
  ref = np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=max(1e-4, 1e-5 * np.abs(ref).max()))


def test_every_registered_crossvit_has_an_exact_count():
  assert sorted(models.list_models(family="crossvit")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


def test_torch_bicubic_weights():
  """Rows sum to one; identity at equal sizes; PyTorch's a=-0.75 kernel at a half step."""
  m = crossvit._torch_cubic_matrix(10, 7)  # pylint: disable=protected-access
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(crossvit._torch_cubic_matrix(5, 5), np.eye(5), atol=1e-6)  # pylint: disable=protected-access
  # Upsampling 2x: output 3 sits at source (3 + 0.5) / 2 - 0.5 = 1.25, so it mixes
  # sources 0..3 with the cubic kernel at distances 1.25, 0.25, 0.75, 1.75.
  up = crossvit._torch_cubic_matrix(4, 8)  # pylint: disable=protected-access
  a = -0.75
  expected = [((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x > 1 else
              ((a + 2) * x - (a + 3)) * x * x + 1 for x in (1.25, 0.25, 0.75, 1.75)]
  np.testing.assert_allclose(up[3], expected, atol=1e-6)


# Parity jobs: real widths, heads and MLP ratios, one block of each multi-scale stage
# shape, and 120x120 inputs (the 16-pixel branch still resizes by 224/240, to 112).
PARITY = [
    ("crossvit_tiny_240", dict(depth=[[1, 2, 0], [1, 1, 0]])),
    ("crossvit_15_dagger_240", dict(depth=[[1, 1, 0]])),
]
SIZE = 120


def _overrides(kw):
  return dict(image_size=SIZE, depth=tuple(tuple(d) for d in kw["depth"]), num_classes=10)


def timm_jobs():
  """Input images and timm jobs (run with DeiT's and TNT's, see plain_timm.py)."""
  images = np.random.RandomState(0).randn(2, SIZE, SIZE, 3).astype(np.float32)
  jobs = [{"model": name, "kwargs": dict(kw, img_size=SIZE, num_classes=10),
           "images": images, "randomize": 0.1, "intermediates": True}
          for name, kw in PARITY]
  return images, jobs


@pytest.fixture(scope="module")
def timm_outputs(plain_timm_outputs):
  return plain_timm_outputs["crossvit"]


@pytest.mark.parametrize("index", range(len(PARITY)))
def test_matches_timm_with_random_weights(timm_outputs, index):
  images, outputs = timm_outputs
  name, kw = PARITY[index]
  ref = outputs[index]
  model = models.create(name, **_overrides(kw))
  params = convert.from_timm(name, state_dict_of(ref), model=model)
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(model, p, x))(
      {"params": params}, images)
  assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  # timm: patch tokens of branch 0 after every block, then of branch 1, as NCHW maps.
  num_blocks = len(kw["depth"])
  for b, (side, patch) in enumerate(zip(model.branch_sizes(), model.patch_size)):
    grid = side // patch
    for i in range(num_blocks):
      ours = inter[f"block_{i}/branch_{b}"][:, 1:].reshape(2, grid, grid, -1)
      assert_features_close(ours.transpose(0, 3, 1, 2),
                            ref[f"intermediates/{b * num_blocks + i}"])
  expected = np.concatenate([ref["features/0"][:, 0], ref["features/1"][:, 0]], axis=-1)
  assert_features_close(inter["features"], expected)
  assert models.param_count(name, **_overrides(kw)) == int(ref["num_params"])


def test_timm_conversion_names_bad_keys(timm_outputs):
  _, outputs = timm_outputs
  state = state_dict_of(outputs[0])
  del state["blocks.1.fusion.0.attn.wk.bias"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'blocks.1.fusion.0.attn.wk.bias'"):
    convert.from_timm("crossvit_tiny_240", state, **_overrides(PARITY[0][1]))


def test_input_size_errors():
  model = models.create("crossvit_9_240", depth=((1, 1, 0),), num_classes=10)
  with pytest.raises(ValueError, match="built for 240x240 images; got 224x224"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  odd = models.create("crossvit_9_240", image_size=108, depth=((1, 1, 0),))
  with pytest.raises(ValueError, match=r"branch 1 resizes 108x108 images to 100x100, which "
                                       r"is not divisible by its patch size 16"):
    jax.eval_shape(lambda x: odd.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 108, 108, 3), jnp.float32))


def test_trains(tfds_dir, tmp_path):
  """Both branches (the second on a bicubic-resized 8x8 image) through the real trainer."""
  result = train_in_process(
      tfds_dir, tmp_path, "crossvit_9_240", steps=30, learning_rate=3e-3,
      image_size=16, image_scale=(1.0, 0.5), patch_size=(4, 4), hidden_size=(32, 48),
      depth=((1, 1, 0),), num_heads=(2, 2), mlp_ratio=(2.0, 2.0, 1.0))
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.2, losses
