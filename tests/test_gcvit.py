"""GC ViT: exact parameter counts, timm parity (logits and stage maps), the global query,
input-size errors, training through the real trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_timm_reference, state_dict_of, train_in_process
from random_variables import random_variables
from vit_jax import models
from vit_jax.models import convert, gcvit, layers

# timm 1.0.31: sum(p.numel()) of timm.create_model(name) built on the meta device
# (one-off script, outside the test process; 1000-class heads).
TIMM_PARAM_COUNTS = {
    "gcvit_xxtiny": 11_995_428,
    "gcvit_xtiny": 19_981_294,
    "gcvit_tiny": 28_221_974,
    "gcvit_small": 51_092_173,
    "gcvit_base": 90_320_836,
}

# Wiring-sized: 32x32 input, two stages with 4x4 windows on 8x8 and 4x4 maps; stage 0
# pools its global query once (8x8 -> 4x4), stage 1 not at all. Drop-path is on:
# calls without a "dropout" rng (evaluation) would fail if it were applied there.
TINY = dict(image_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
            window_ratios=(8, 8), mlp_ratio=2.0, layer_scale=0.5, num_classes=10,
            head_zeroinit=False, drop_path_rate=0.5)


def test_every_registered_gcvit_has_an_exact_count():
  assert sorted(models.list_models(family="gcvit")) == sorted(TIMM_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


def _timm_kwargs(name: str, depths) -> dict:
  """timm's registered GC ViT names fix the depths: build the class with the
  variant's own settings (checked against timm by the exact counts above)."""
  dim, _, heads, mlp_ratio, layer_scale = gcvit.VARIANTS[name]
  return dict(embed_dim=dim, depths=list(depths), num_heads=list(heads),
              mlp_ratio=mlp_ratio, layer_scale=layer_scale)


# Parity jobs: real widths and heads, reduced depth (every stage has a global block):
# - gcvit_xxtiny at 224: the real windows 7, 7, 14, 7 and global queries pooled 3, 2,
#   0, 0 times.
# - gcvit_small (layer scale, MLP ratio 2) built for 96x96: windows 3, 3, 6, 3.
RNG = np.random.RandomState(0)
JOBS = {
    "xxtiny_224": dict(
        name="gcvit_xxtiny", ours=dict(depths=(2, 2, 2, 2), num_classes=10),
        images=RNG.randn(2, 224, 224, 3).astype(np.float32),
        timm=dict(_timm_kwargs("gcvit_xxtiny", (2, 2, 2, 2)), num_classes=10)),
    "small_96": dict(
        name="gcvit_small", ours=dict(depths=(1, 2, 2, 2), image_size=96),
        images=RNG.randn(2, 96, 96, 3).astype(np.float32),
        timm=dict(_timm_kwargs("gcvit_small", (1, 2, 2, 2)), img_size=96)),
}


@pytest.fixture(scope="module")
def timm_outputs(tmp_path_factory):
  """Every timm run of this module, in one subprocess (random weights, scale 0.05)."""
  jobs = [{"model": job["name"], "class": "timm.models.gcvit.GlobalContextVit",
           "kwargs": job["timm"], "images": job["images"], "randomize": 0.05,
           "intermediates": True,
           "one_pass": True} for job in JOBS.values()]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_gcvit"))
  return dict(zip(JOBS, outputs))


@pytest.mark.parametrize("key", sorted(JOBS))
def test_matches_timm_logits_and_stage_maps(timm_outputs, key):
  job, ref = JOBS[key], timm_outputs[key]
  model = models.create(job["name"], **job["ours"])
  params = convert.from_timm(job["name"], state_dict_of(ref), model=model)
  assert models.param_count(job["name"], **job["ours"]) == int(ref["num_params"])
  logits, inter = jax.jit(lambda p, x: models.forward_intermediates(
      model, {"params": p}, x))(params, job["images"])
  assert 0.1 < np.abs(ref["logits"]).mean() < 3  # logits of order 1
  print(f"{key}: max |logit diff| {np.abs(logits - ref['logits']).max():.2e}")
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  for i in range(4):
    expected = ref[f"intermediates/{i}"].transpose(0, 2, 3, 1)  # timm gives NCHW
    print(f"  stage_{i}: max |diff| {np.abs(inter[f'stage_{i}'] - expected).max():.2e}")
    np.testing.assert_allclose(inter[f"stage_{i}"], expected, atol=1e-4, rtol=1e-4,
                               err_msg=f"stage_{i}")


def test_conversion_names_bad_keys(timm_outputs):
  job = JOBS["small_96"]
  state = state_dict_of(timm_outputs["small_96"])
  del state["stages.0.global_block.blocks.conv2.se.fc1.weight"]
  with pytest.raises(convert.ConversionError,
                     match=r"no entry 'stages\.0\.global_block\.blocks\.conv2\.se\.fc1"):
    convert.from_timm(job["name"], state, **job["ours"])
  state = state_dict_of(timm_outputs["small_96"])
  state["stages.3.blocks.1.attn.extra"] = np.zeros(1)
  with pytest.raises(convert.ConversionError,
                     match=r"unexpected: stages\.3\.blocks\.1\.attn\.extra"):
    convert.from_timm(job["name"], state, **job["ours"])
  # Weights of a model without layer scale do not fit one with it.
  state = state_dict_of(timm_outputs["xxtiny_224"])
  with pytest.raises(convert.ConversionError, match=r"no entry 'stages\.0\.blocks\.0\.ls1"):
    convert.from_timm("gcvit_xxtiny", state, depths=(2, 2, 2, 2), num_classes=10,
                      layer_scale=1e-5)


def test_stage_geometry_of_the_registered_models():
  assert models.create("gcvit_tiny").stage_geometry() == [
      ((56, 56), (7, 7), 3), ((28, 28), (7, 7), 2), ((14, 14), (14, 14), 0),
      ((7, 7), (7, 7), 0)]


@pytest.fixture(scope="module")
def tiny():
  model = models.create("gcvit_xxtiny", **TINY)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  return model, random_variables(model, images), images


def test_global_blocks_take_the_pooled_query(tiny):
  _, variables, _ = tiny
  params = variables["params"]
  # Local blocks project a query, global ones take the pooled global query instead.
  assert "query" in params["stages_0"]["blocks_0"]["attn"]
  assert "query" not in params["stages_0"]["blocks_1"]["attn"]
  assert params["stages_0"]["blocks_1"]["attn"]["key"]["kernel"].shape == (16, 2, 8)


def test_global_query_attention_against_per_window_reference(tiny):
  """Every window attends from the same (global) query to its own keys and values."""
  _, variables, _ = tiny
  attn = variables["params"]["stages_0"]["blocks_1"]["attn"]
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 16))
  query = jax.random.normal(jax.random.key(3), (1, 4, 4, 16))
  bias = jax.random.normal(jax.random.key(4), (2, 16, 16))

  @jax.jit
  def both(x, query, bias):
    out = gcvit.GlobalQueryAttention(num_heads=2, window=(4, 4)).apply(
        {"params": attn}, x, query, bias=bias)
    project = lambda t, name: (jnp.einsum("bnc,chd->bnhd", t, attn[name]["kernel"])
                               + attn[name]["bias"])
    q = query.reshape(1, 16, 2, 8)
    expected = []
    for i in range(2):
      for j in range(2):
        window = x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(1, 16, 16)
        y = layers.dot_product_attention(q, project(window, "key"),
                                         project(window, "value"), bias=bias[None])
        expected.append(jnp.einsum("bnhd,hdc->bnc", y, attn["out"]["kernel"])
                        + attn["out"]["bias"])
    return out, expected

  out, expected = both(x, query, bias)
  for n, y in enumerate(expected):
    i, j = divmod(n, 2)
    np.testing.assert_allclose(out[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(y.shape),
                               y, atol=1e-5)


def test_input_size_errors(tiny):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match=r"built for 32x32 images .* got 64x64\. Create "
                                       r"the model with image_size=\(64, 64\)"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)))
  # image_size=36: 4x4 windows, but stage 0's 9x9 map pools to a 5x5 global query.
  odd = models.create("gcvit_xxtiny", **{**TINY, "image_size": 36})
  with pytest.raises(ValueError, match=r"stage map 9x9 pools to a 5x5 global query, but "
                                       r"its window is 4x4"):
    jax.eval_shape(odd.init, jax.random.key(0), jnp.zeros((1, 36, 36, 3)))


def test_trains(tfds_dir, tmp_path):
  # 16x16 digits, one stage: a 4x4 map, 2x2 windows, a local and a global block whose
  # query is pooled once. (Compiling init dominates: one stage keeps it affordable.)
  result = train_in_process(tfds_dir, tmp_path / "gcvit", "gcvit_xxtiny", steps=60,
                            learning_rate=3e-3, input_size=16, image_size=16,
                            embed_dim=32, depths=(2,), num_heads=(2,), window_ratios=(8,),
                            drop_path_rate=0.1)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0] - 0.1, losses
