"""EfficientViT-M (m0-m5): counts, timm parity incl. BatchNorm statistics, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (check_trained_batch_stats, run_timm_reference, state_dict_of,
                     train_in_process)
from vit_jax import models
from vit_jax.models import convert, efficientvit_msra

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), models
# built on the meta device in a one-off script (1000-class heads, 224x224; the
# attention-bias tables depend on the resolution). BatchNorm buffers are not counted.
TIMM_PARAM_COUNTS = {
    "efficientvit_m0": 2_349_436,
    "efficientvit_m1": 2_980_560,
    "efficientvit_m2": 4_187_554,
    "efficientvit_m3": 6_900_722,
    "efficientvit_m4": 8_804_228,
    "efficientvit_m5": 12_473_772,
}

# Parity cases: (timm name, depths, image side, randomize scale). One block per stage
# keeps CPU compiles short; widths, heads, key dims and kernels are the real ones.
# At 224 stage 1 runs 2x2 windows of 7x7; at 160 the 10x10 map is zero-padded into
# 7x7 windows. The random-weight scale keeps the logits of order 1; the weights,
# biases and BatchNorm statistics are all random.
PARITY = [
    ("efficientvit_m0", (1, 1, 1), 224, 0.08),
    ("efficientvit_m2", (1, 1, 1), 160, 0.07),
]
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  """All timm reference runs of this module, in one subprocess."""
  rng = np.random.RandomState(0)
  jobs = [{"model": name, "kwargs": {"num_classes": NUM_CLASSES, "depth": list(depths),
                                     "img_size": size},
           "images": rng.randn(2, size, size, 3).astype(np.float32), "randomize": scale,
           "intermediates": True} for name, depths, size, scale in PARITY]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_efficientvit_msra"))
  return [dict(out, images=job["images"]) for out, job in zip(outputs, jobs)]


def test_every_registered_efficientvit_msra_has_an_exact_count():
  assert sorted(models.list_models(family="efficientvit_msra")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


def test_relative_position_index_matches_first_seen_numbering():
  """timm numbers offsets (|dy|, |dx|) in the order it first meets them."""
  resolution = 4
  points = [(y, x) for y in range(resolution) for x in range(resolution)]
  seen, expected = {}, []
  for p in points:
    for q in points:
      offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
      expected.append(seen.setdefault(offset, len(seen)))
  np.testing.assert_array_equal(
      efficientvit_msra.relative_position_index(resolution),
      np.array(expected).reshape(16, 16))


def model_for(case):
  name, depths, size, _ = PARITY[case]
  return name, models.create(name, num_classes=NUM_CLASSES, depths=depths, image_size=size)


@pytest.mark.parametrize("case", range(len(PARITY)), ids=[p[0] for p in PARITY])
def test_matches_timm_with_random_weights(timm_outputs, case):
  """Eval-mode logits and stage maps equal timm's, running statistics included."""
  ref = timm_outputs[case]
  name, model = model_for(case)
  variables = convert.variables_from_timm(name, state_dict_of(ref), model=model)
  assert set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(
      variables["batch_stats"]["stages_0_blocks_0"]["dw0"]["bn"]["var"],
      ref["state/stages.0.blocks.0.dw0.m.bn.running_var"])
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
  name, depths, size, _ = PARITY[0]
  state = state_dict_of(timm_outputs[0])
  kwargs = dict(num_classes=NUM_CLASSES, depths=depths, image_size=size)
  assert "stages.0.blocks.0.dw0.m.bn.num_batches_tracked" in state  # skipped, not used
  with pytest.raises(convert.ConversionError, match="use convert.variables_from_timm"):
    convert.from_timm(name, state, **kwargs)
  # The bias tables are sized for 224x224: another size is a named mismatch.
  with pytest.raises(convert.ConversionError,
                     match=r"params/stages_0_blocks_0/mixer/attn/attention_biases: "
                           r"expected \(4, 16\), found \(4, 49\)"):
    convert.variables_from_timm(name, state, **{**kwargs, "image_size": 64})
  state["head.bn.extra"] = np.zeros(3)
  with pytest.raises(convert.ConversionError, match="unexpected: head.bn.extra"):
    convert.variables_from_timm(name, state, **kwargs)
  del state["head.bn.extra"]
  del state["stages.2.blocks.0.mixer.m.attn.dws.3.bn.running_var"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'stages.2.blocks.0.mixer.m.attn.dws.3.bn.running_var'"):
    convert.variables_from_timm(name, state, **kwargs)


TINY = dict(embed_dims=(16, 24, 32), key_dims=(4, 4, 4), depths=(1, 1, 1),
            num_heads=(2, 2, 2), kernels=(3, 5), image_size=32)


def test_input_size_and_config_errors():
  model = models.create("efficientvit_m0", num_classes=NUM_CLASSES, **TINY)
  assert model.stage_windows() == [2, 1, 1]
  assert models.create("efficientvit_m0").stage_windows() == [7, 7, 4]
  with pytest.raises(ValueError, match=r"built for 32x32 images .* got 48x32\. Create it "
                                       r"with image_size=\(48, 32\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 48, 32, 3)))
  bad = models.create("efficientvit_m0", **{**TINY, "num_heads": (3, 2, 2)})
  with pytest.raises(ValueError, match="width 16 is not divisible by num_heads=3"):
    jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# One stage of one block at 32x32 (2x2 attention windows): XLA's CPU compile of the
# trainer's init and step grows with the number of parameters; steps are cheap.
TRAIN = dict(embed_dims=(16,), key_dims=(4,), depths=(1,), num_heads=(2,),
             window_sizes=(7,), kernels=(3, 5), image_size=32)


def test_trains_and_keeps_batch_stats(tfds_dir, tmp_path):
  """Loss falls; BatchNorm statistics move in training and are what eval uses."""
  result = train_in_process(tfds_dir, tmp_path, "efficientvit_m0", steps=60,
                            input_size=32, learning_rate=5e-3, drop_path_rate=0.1, **TRAIN)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.2, losses
  model = models.create("efficientvit_m0", num_classes=NUM_CLASSES, **TRAIN)
  check_trained_batch_stats(tfds_dir, tmp_path, result, model, input_size=32)
