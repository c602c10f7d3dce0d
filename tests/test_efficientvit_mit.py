"""EfficientViT (MIT): exact parameter counts, timm parity, kernels, training, errors.

Parity runs timm's ``efficientvit_mit`` with random weights (every weight, bias,
norm and BatchNorm statistic randomised) in a subprocess, converts its state dict
and compares logits and the four stage outputs in float32, eval mode. To keep the
CPU compile time low the references use reduced depth (one block per stage) at
64x64, keeping each variant's real widths, head dims and head widths: B0 (the B
layout) and L1 (the large layout: ConvBlock stem, fused MBConvs, GELU-tanh, eps
1e-7, head dim 32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import state_dict_of, train_in_process
from vit_jax import models
from vit_jax.models import convert

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()), built
# under `with torch.device("meta")` in a one-off script (1000-class heads).
TIMM_PARAM_COUNTS = {
    "efficientvit_b0": 3_410_008,
    "efficientvit_b1": 9_102_024,
    "efficientvit_b2": 24_330_712,
    "efficientvit_b3": 48_646_056,
    "efficientvit_l1": 52_654_088,
    "efficientvit_l2": 63_707_016,
    "efficientvit_l3": 246_037_288,
}

REDUCED = dict(depths=(1, 1, 1, 1, 1))
PARITY = ["efficientvit_b0", "efficientvit_l1"]
IMAGES = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
# A tiny B-layout model (one attention block in each of stages 3 and 4).
TINY = dict(widths=(8, 16, 16, 32, 32), depths=(0, 1, 1, 1, 1), head_dim=8,
            head_widths=(32, 32), num_classes=10, image_size=32)


def random_variables(model, shape, seed=0):
  """Random weights and BatchNorm statistics without compiling ``model.init``.

  (XLA:CPU takes seconds to compile the random initialisers of even a tiny
  network; the parameter shapes come from ``jax.eval_shape`` instead.)
  """
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    noise = 0.2 * rng.randn(*leaf.shape).astype(np.float32)
    name = path[-1].key
    return jnp.asarray(1.0 + np.abs(noise) if name == "var" else
                       1.0 + noise if name == "scale" else noise)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def test_every_registered_variant_has_an_exact_count():
  assert sorted(models.list_models(family="efficientvit_mit")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  from helpers import run_timm_reference  # pylint: disable=g-import-not-at-top
  jobs = [{"model": name, "kwargs": dict(REDUCED, num_classes=10), "images": IMAGES,
           "randomize": 0.1, "intermediates": True} for name in PARITY]
  return dict(zip(PARITY, run_timm_reference(jobs, tmp_path_factory.mktemp("timm"))))


@pytest.mark.parametrize("name", PARITY)
def test_matches_timm_with_random_weights(name, timm_outputs):
  ref = timm_outputs[name]
  model = models.create(name, num_classes=10, image_size=64, **REDUCED)
  variables = convert.variables_from_timm(name, state_dict_of(ref), model=model)
  assert set(variables) == {"params", "batch_stats"}
  logits, inter = models.forward_intermediates(model, variables, IMAGES)
  assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1, not ~0
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(4):
    want = ref[f"intermediates/{i}"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(inter[f"stage_{i}"], want, atol=1e-5 * scale, rtol=0)
  np.testing.assert_allclose(inter["stage_3"], ref["features"].transpose(0, 2, 3, 1),
                             atol=1e-5 * max(1.0, float(np.abs(ref["features"]).max())))
  assert models.param_count(name, num_classes=10, **REDUCED) == int(ref["num_params"])


def test_conversion_names_bad_keys(timm_outputs):
  name = "efficientvit_b0"
  model = models.create(name, num_classes=10, image_size=64, **REDUCED)
  state = state_dict_of(timm_outputs[name])
  state["extra.weight"] = np.zeros(3)
  with pytest.raises(convert.ConversionError, match="unexpected: extra.weight"):
    convert.variables_from_timm(name, state, model=model)
  del state["extra.weight"]
  del state["stages.2.blocks.1.context_module.main.aggreg.0.1.weight"]
  with pytest.raises(convert.ConversionError,
                     match=r"no entry 'stages.2.blocks.1.context_module.main.aggreg.0.1"):
    convert.variables_from_timm(name, state, model=model)
  state = state_dict_of(timm_outputs[name])
  with pytest.raises(convert.ConversionError, match="also keeps batch_stats: use "
                     "convert.variables_from_timm"):
    convert.from_timm(name, state, model=model)


def test_structure_and_stage_maps():
  model = models.create("efficientvit_b0", **TINY)
  images = jax.ShapeDtypeStruct((2, 40, 48, 3), jnp.float32)  # any size works
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert set(variables) == {"params", "batch_stats"}
  block = variables["params"]["stages_2"]["blocks_1"]["context_module"]["main"]
  assert block["aggreg_0_0"]["kernel"].shape == (5, 5, 1, 3 * 32)  # depthwise 5x5
  assert block["aggreg_0_1"]["kernel"].shape == (1, 1, 8, 3 * 32)  # grouped per head
  _, inter = jax.eval_shape(lambda v, x: models.forward_intermediates(model, v, x),
                            variables, images)
  assert [inter[f"stage_{i}"].shape for i in range(4)] == [
      (2, 10, 12, 16), (2, 5, 6, 16), (2, 3, 3, 32), (2, 2, 2, 32)]


def test_pallas_linear_attention_gives_the_same_logits_and_gradients():
  images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  model = models.create("efficientvit_b0", **TINY)
  variables = random_variables(model, images.shape)
  probe = jax.random.normal(jax.random.key(2), (1, 10))
  results = {}
  for impl in ("xla", "pallas"):
    m = models.create("efficientvit_b0", attention_impl=impl, **TINY)

    def loss(p, m=m):
      logits, state = m.apply({**variables, "params": p}, images,
                              mutable=["intermediates"])
      return jnp.sum(logits * probe), (logits, state["intermediates"]["stage_3"][0])

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"])
    results[impl] = outputs + (grads,)
  assert np.abs(results["xla"][0]).mean() > 0.1
  for i in (0, 1):  # logits, and the last stage (after two linear-attention blocks)
    np.testing.assert_allclose(results["pallas"][i], results["xla"][i], atol=1e-4)
  for (path, gx), gp in zip(jax.tree_util.tree_flatten_with_path(results["xla"][2])[0],
                            jax.tree.leaves(results["pallas"][2])):
    np.testing.assert_allclose(gp, gx, atol=1e-4 * max(1.0, float(np.abs(gx).max())),
                               err_msg=str(path))


def test_trains(tfds_dir, tmp_path):
  """The real trainer on the offline digits at 32x32: the loss falls."""
  # The smallest stack with an attention block: stem conv, four downsampling
  # MBConvs, one EfficientViT block (compiling the train step dominates the time).
  small = dict(widths=(16, 32, 32, 64, 64), depths=(0, 1, 1, 0, 1), head_dim=16,
               head_widths=(64, 64), num_classes=10, image_size=32)
  result = train_in_process(tfds_dir, tmp_path, "efficientvit_b0", steps=30,
                            input_size=32, learning_rate=1e-2, **small)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.3, losses
