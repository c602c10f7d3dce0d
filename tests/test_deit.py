"""DeiT family: exact parameter counts, the distilled model's two heads, timm parity.

Training through the real trainer (with and without a teacher) is in
``test_distillation.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import state_dict_of
from vit_jax import models
from vit_jax.models import convert, vit

# plain_timm_outputs: one timm subprocess for DeiT, CrossViT and TNT (a plugin, so
# that the session fixture is shared by the three modules).
pytest_plugins = ["plain_timm"]

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), models built
# on the meta device in a one-off script (1000-class heads, default resolution).
TIMM_PARAM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_base_patch16_384": 86_859_496,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit_base_distilled_patch16_384": 87_630_032,
}


def assert_features_close(ours, ref):
  """Block features: float32 round-off grows with the residual stream's scale (|x| ~ 30
  at base width with random weights), so the 1e-4 bound is relative to the largest."""
  ref = np.asarray(ref)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=max(1e-4, 1e-5 * np.abs(ref).max()))

TINY = dict(image_size=32, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
            num_classes=10, head_zeroinit=False)


def test_every_registered_deit_has_an_exact_count():
  assert sorted(models.list_models(family="deit")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


def test_distilled_model_returns_both_heads_in_training_and_their_mean_at_eval():
  model = models.create("deit_tiny_distilled_patch16_224", **TINY)
  plain = models.create("deit_tiny_distilled_patch16_224", distilled_training=False, **TINY)
  headless = models.create("deit_tiny_distilled_patch16_224", **{**TINY, "num_classes": 0})
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  params = variables["params"]
  assert params["dist"].shape == (1, 1, 32)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 4 + 2, 32)

  @jax.jit
  def run(variables, images):
    trunk = {"params": {k: v for k, v in variables["params"].items()
                        if k not in ("head", "head_dist")}}
    return (model.apply(variables, images, train=True),
            models.forward_intermediates(model, variables, images),
            plain.apply(variables, images, train=True), headless.apply(trunk, images))

  (logits, logits_dist), (averaged, inter), plain_train, pooled = run(variables, images)
  assert logits.shape == logits_dist.shape == (3, 10) and logits.dtype == jnp.float32
  assert not np.allclose(logits, logits_dist, atol=1e-3)  # two different heads
  np.testing.assert_allclose(averaged, (logits + logits_dist) / 2, atol=1e-6)
  # distilled_training=False: the average in training too (fine-tuning without a teacher).
  np.testing.assert_allclose(plain_train, averaged, atol=1e-6)
  # Without heads: the mean of the two tokens' features (timm's pre-logits).
  np.testing.assert_allclose(pooled, inter["features"], atol=1e-6)


def test_distilled_model_errors():
  init = lambda model, side: jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
  with pytest.raises(ValueError, match="needs classifier='token', posemb='learn'"):
    init(models.create("deit_tiny_distilled_patch16_224", classifier="gap", **TINY), 32)
  with pytest.raises(ValueError, match=r"built for 32x32 images \(2x2 patches\); got 48x48"):
    init(models.create("deit_tiny_distilled_patch16_224", **TINY), 48)


def test_distilled_model_takes_every_vit_setting_through_the_hooks():
  """The distilled model overrides two ViT hooks only: scanned blocks, remat and
  the linear attention reach its encoder as they reach the ViT's."""
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  model = models.create("deit_tiny_distilled_patch16_224", **TINY)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  scanned = models.create("deit_tiny_distilled_patch16_224", scan_layers=True,
                          remat_policy="full", **TINY)
  stacked = {"params": vit.stack_block_params(variables["params"])}
  linear = models.create("deit_tiny_distilled_patch16_224", attention="linear", **TINY)
  logits, logits_scanned, logits_linear = jax.jit(lambda v, s, x: (
      model.apply(v, x), scanned.apply(s, x), linear.apply(v, x)))(variables, stacked, images)
  np.testing.assert_allclose(logits_scanned, logits, atol=1e-5)
  assert not np.allclose(logits_linear, logits, atol=1e-3)  # another attention, same params


# Parity jobs: real widths and heads, fewer blocks and a 32x32 input (2x2 patches) so
# that the JAX compiles stay cheap on CPU.
PARITY = [
    ("deit_tiny_patch16_224", dict(depth=2)),
    ("deit_small_distilled_patch16_224", dict(depth=2)),
    ("deit_base_distilled_patch16_224", dict(depth=1)),
]


def timm_jobs():
  """Input images and timm jobs (run with CrossViT's and TNT's, see plain_timm.py)."""
  images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  jobs = [{"model": name, "kwargs": dict(kw, img_size=32, num_classes=10),
           "images": images, "randomize": 0.1, "intermediates": True}
          for name, kw in PARITY]
  jobs.append({"model": "deit_tiny_distilled_patch16_224",
               "kwargs": dict(depth=1, img_size=32, num_classes=10), "images": images})
  return images, jobs


@pytest.fixture(scope="module")
def timm_outputs(plain_timm_outputs):
  return plain_timm_outputs["deit"]


@pytest.mark.parametrize("index", range(len(PARITY)))
def test_matches_timm_with_random_weights(timm_outputs, index):
  images, outputs = timm_outputs
  name, kw = PARITY[index]
  ref = outputs[index]
  overrides = dict(image_size=32, num_layers=kw["depth"], num_classes=10)
  model = models.create(name, **overrides)
  params = convert.from_timm(name, state_dict_of(ref), model=model)
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(model, p, x))(
      {"params": params}, images)
  assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  prefix = 2 if "distilled" in name else 1
  for i in range(kw["depth"]):  # timm: patch tokens only, as NCHW maps
    ours = inter[f"Transformer/block_{i}"][:, prefix:].reshape(2, 2, 2, -1)
    assert_features_close(ours.transpose(0, 3, 1, 2), ref[f"intermediates/{i}"])
  assert_features_close(inter["features"], ref["features"][:, :prefix].mean(axis=1))
  assert models.param_count(name, **overrides) == int(ref["num_params"])


def test_timm_conversion_names_bad_keys(timm_outputs):
  _, outputs = timm_outputs
  state = state_dict_of(outputs[-1])
  overrides = dict(image_size=32, num_layers=1, num_classes=10)
  convert.from_timm("deit_tiny_distilled_patch16_224", state, **overrides)  # fits
  with pytest.raises(convert.ConversionError, match="unexpected: dist_token"):
    convert.from_timm("deit_tiny_patch16_224", state, **overrides)
  del state["head_dist.bias"]
  with pytest.raises(convert.ConversionError, match="no entry 'head_dist.bias'"):
    convert.from_timm("deit_tiny_distilled_patch16_224", state, **overrides)
