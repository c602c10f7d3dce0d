"""SHViT (s1-s4): counts, timm parity incl. BatchNorm statistics, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (check_trained_batch_stats, run_timm_reference, state_dict_of,
                     train_in_process)
from vit_jax import models
from vit_jax.models import convert

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), models
# built on the meta device in a one-off script (1000-class heads; no parameter
# depends on the resolution). BatchNorm buffers are not counted.
TIMM_PARAM_COUNTS = {
    "shvit_s1": 6_330_808,
    "shvit_s2": 11_483_072,
    "shvit_s3": 14_245_273,
    "shvit_s4": 16_588_484,
}

# Parity cases: (timm name, depths, image side, randomize scale). Depth is cut to keep
# CPU compiles short; widths, partial and qk dims are the real ones; stage 1 is
# conv-only as in every SHViT. The random-weight scale keeps the logits of order 1;
# the weights, biases and BatchNorm statistics are all random.
PARITY = [
    ("shvit_s1", (1, 1, 1), 128, 0.07),
    ("shvit_s4", (1, 2, 1), 128, 0.06),
]
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  """All timm reference runs of this module, in one subprocess."""
  rng = np.random.RandomState(0)
  jobs = [{"model": name, "kwargs": {"num_classes": NUM_CLASSES, "depth": list(depths)},
           "images": rng.randn(2, size, size, 3).astype(np.float32), "randomize": scale,
           "intermediates": True} for name, depths, size, scale in PARITY]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_shvit"))
  return [dict(out, images=job["images"]) for out, job in zip(outputs, jobs)]


def test_every_registered_shvit_has_an_exact_count():
  assert sorted(models.list_models(family="shvit")) == sorted(TIMM_PARAM_COUNTS)
  assert models.input_shape("shvit_s4") == (1, 256, 256, 3)  # timm's default for s4


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize("case", range(len(PARITY)), ids=[p[0] for p in PARITY])
def test_matches_timm_with_random_weights(timm_outputs, case):
  """Eval-mode logits and stage maps equal timm's, running statistics included."""
  name, depths, _, _ = PARITY[case]
  ref = timm_outputs[case]
  model = models.create(name, num_classes=NUM_CLASSES, depths=depths)
  variables = convert.variables_from_timm(name, state_dict_of(ref), model=model)
  np.testing.assert_array_equal(variables["batch_stats"]["head"]["bn"]["mean"],
                                ref["state/head.bn.running_mean"])
  logits, inter = jax.jit(lambda v, x: models.forward_intermediates(model, v, x))(
      variables, ref["images"])
  assert 0.3 < np.abs(ref["logits"]).mean() < 30  # logits of order 1
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(3):
    expected = ref[f"intermediates/{i}"].transpose(0, 2, 3, 1)  # timm maps are NCHW
    scale = np.abs(expected).max()
    np.testing.assert_allclose(inter[f"stage_{i}"] / scale, expected / scale, atol=1e-5,
                               rtol=0, err_msg=f"stage {i}")


def test_timm_conversion_names_bad_keys(timm_outputs):
  name, depths, _, _ = PARITY[0]
  state = state_dict_of(timm_outputs[0])
  kwargs = dict(num_classes=NUM_CLASSES, depths=depths)
  with pytest.raises(convert.ConversionError, match="use convert.variables_from_timm"):
    convert.from_timm(name, state, **kwargs)
  with pytest.raises(convert.ConversionError,
                     match=r"shape mismatch: params/head/linear/bias: expected \(5,\), found "
                           r"\(10,\)"):
    convert.variables_from_timm(name, state, **{**kwargs, "num_classes": 5})
  del state["stages.1.blocks.0.mixer.m.qkv.bn.running_mean"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'stages.1.blocks.0.mixer.m.qkv.bn.running_mean'"):
    convert.variables_from_timm(name, state, **kwargs)


TINY = dict(embed_dims=(16, 24, 32), partial_dims=(8, 8, 8), qk_dims=(4, 4, 4),
            depths=(1, 1, 1), mixers=("i", "s", "s"))


def test_stage_maps_and_config_errors():
  images = jax.ShapeDtypeStruct((2, 48, 64, 3), jnp.float32)  # any size works
  model = models.create("shvit_s1", **TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  _, inter = jax.eval_shape(lambda v, x: models.forward_intermediates(model, v, x),
                            variables, images)
  assert inter["stage_0"].shape == (2, 3, 4, 16) and inter["stage_2"].shape == (2, 1, 1, 32)
  bad = models.create("shvit_s1", **{**TINY, "partial_dims": (8, 30, 8)})
  with pytest.raises(ValueError, match=r"partial_dim=30 must be in \(0, 24\]"):
    jax.eval_shape(bad.init, jax.random.key(0), images)
  with pytest.raises(ValueError, match="mixers are 's' .* got \\['x'\\]"):
    jax.eval_shape(models.create("shvit_s1", **{**TINY, "mixers": ("i", "x", "s")}).init,
                   jax.random.key(0), images)


# One stage of one block at 64x64 (attention over 4x4 tokens): XLA's CPU compile of
# the trainer's init and step grows with the number of parameters; steps are cheap.
TRAIN = dict(embed_dims=(16,), partial_dims=(8,), qk_dims=(4,), depths=(1,), mixers=("s",))


def test_trains_and_keeps_batch_stats(tfds_dir, tmp_path):
  """Loss falls; BatchNorm statistics move in training and are what eval uses."""
  result = train_in_process(tfds_dir, tmp_path, "shvit_s1", steps=60, input_size=64,
                            learning_rate=5e-3, drop_path_rate=0.1, **TRAIN)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.2, losses
  model = models.create("shvit_s1", num_classes=NUM_CLASSES, **TRAIN)
  check_trained_batch_stats(tfds_dir, tmp_path, result, model, input_size=64)
