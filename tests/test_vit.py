"""ViT family: exact parameter counts, layout, heads, dtypes, errors, timm parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import state_dict_of
from vit_jax import models
from vit_jax.models import convert

# timm's sum(p.numel()) for timm.models.vision_transformer.VisionTransformer with the
# same size, patch, resolution and a 1000-class head (timm 1.0.31, meta device).
# timm's own registered vit_huge_patch14_224 and vit_small_patch8_224 are headless by
# default; with a 1000-class head they count exactly what is listed here.
TIMM_PARAM_COUNTS = {
    "vit_tiny_patch8_224": 5_719_720,
    "vit_tiny_patch14_224": 5_694_376,
    "vit_tiny_patch16_224": 5_717_416,
    "vit_tiny_patch16_384": 5_790_376,
    "vit_tiny_patch32_224": 6_131_560,
    "vit_tiny_patch32_384": 6_149_800,
    "vit_small_patch8_224": 22_055_272,
    "vit_small_patch14_224": 22_004_584,
    "vit_small_patch16_224": 22_050_664,
    "vit_small_patch16_384": 22_196_584,
    "vit_small_patch32_224": 22_878_952,
    "vit_small_patch32_384": 22_915_432,
    "vit_base_patch8_224": 86_576_872,
    "vit_base_patch14_224": 86_475_496,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch16_384": 86_859_496,
    "vit_base_patch32_224": 88_224_232,
    "vit_base_patch32_384": 88_297_192,
    "vit_large_patch8_224": 304_338_920,
    "vit_large_patch14_224": 304_203_752,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch16_384": 304_715_752,
    "vit_large_patch32_224": 306_535_400,
    "vit_large_patch32_384": 306_632_680,
    "vit_huge_patch8_224": 632_214_760,
    "vit_huge_patch14_224": 632_045_800,
    "vit_huge_patch16_224": 632_199_400,
    "vit_huge_patch16_384": 632_685_800,
    "vit_huge_patch32_224": 634_960_360,
    "vit_huge_patch32_384": 635_081_960,
    # CLIP image towers (timm's own registrations: pre-norm, no patch bias).
    "vit_base_patch32_clip_224": 88_225_000,
    "vit_base_patch16_clip_224": 86_568_424,
    "vit_large_patch14_clip_224": 304_204_776,
}

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
            mlp_dim=64, num_classes=10)


def init(model, shape=(2, 32, 32, 3), seed=0):
  images = jax.random.normal(jax.random.key(seed + 1), shape)
  return model.init(jax.random.key(seed), images), images


def test_every_registered_vit_has_an_exact_count():
  """The mixture-of-experts ViTs are counted against vmoe's shapes in test_moe.py."""
  from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
  moe_names = [*vit.VMOE_VARIANTS, *vit.SOFT_MOE_VARIANTS]
  assert sorted(models.list_models(family="vit")) == sorted([*TIMM_PARAM_COUNTS,
                                                             *moe_names])


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == TIMM_PARAM_COUNTS[name]


def test_vit_b16_is_86_567_656():
  assert models.param_count("vit_base_patch16_224") == 86_567_656


def test_head_variants_change_counts_as_expected():
  base = models.param_count("vit_base_patch16_224")
  d = 768
  # No class token; the position embedding loses the class slot.
  assert models.param_count("vit_base_patch16_224", classifier="gap") == base - 2 * d
  # MAP: probe + attention (4 d^2 + 4 d) + LN (2 d) + MLP (2 * d * 3072 + 3072 + d).
  map_head = d + 4 * d * d + 4 * d + 2 * d + 2 * d * 3072 + 3072 + d
  assert models.param_count("vit_base_patch16_224", classifier="map") == (
      base - 2 * d + map_head)
  assert models.param_count("vit_base_patch16_224", representation_size=768) == (
      base + d * d + d)
  assert models.param_count("vit_base_patch16_224", posemb="sincos2d") == base - 197 * d
  assert models.param_count("vit_base_patch16_224", num_classes=0) == base - 1000 * d - 1000


def test_parameter_names_follow_vision_transformer_layout():
  variables, _ = init(models.create("vit_tiny_patch16_224", **TINY))
  flat = {"/".join(str(k.key) for k in path): x.shape for path, x in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  assert flat["embedding/kernel"] == (8, 8, 3, 32)
  assert flat["cls"] == (1, 1, 32)
  assert flat["Transformer/posembed_input/pos_embedding"] == (1, 17, 32)
  block = "Transformer/encoderblock_1"
  assert flat[f"{block}/MultiHeadDotProductAttention_1/query/kernel"] == (32, 4, 8)
  assert flat[f"{block}/MultiHeadDotProductAttention_1/out/kernel"] == (4, 8, 32)
  assert flat[f"{block}/MlpBlock_3/Dense_0/kernel"] == (32, 64)
  assert flat[f"{block}/LayerNorm_2/scale"] == (32,)
  assert flat["Transformer/encoder_norm/bias"] == (32,)
  assert flat["head/kernel"] == (32, 10)


@pytest.mark.parametrize("classifier", ["token", "gap", "map"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_heads_and_position_embeddings(classifier, posemb):
  model = models.create("vit_tiny_patch16_224", classifier=classifier, posemb=posemb,
                        head_zeroinit=False, **TINY)
  variables, images = init(model)
  logits = model.apply(variables, images)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0
  # Examples do not leak into each other.
  single = model.apply(variables, images[:1])
  np.testing.assert_allclose(single, logits[:1], atol=1e-5)
  # The position embedding matters: shuffling patches changes the output.
  flipped = model.apply(variables, images[:, ::-1])
  assert not np.allclose(flipped, logits, atol=1e-4)


def test_wrong_image_sizes_are_clear_errors():
  model = models.create("vit_tiny_patch16_224", **TINY)
  variables, _ = init(model)
  with pytest.raises(ValueError, match="divisible by 8; got 30x32"):
    model.apply(variables, jnp.zeros((1, 30, 32, 3)))
  with pytest.raises(ValueError, match=r"built for 32x32 images \(4x4 patches\); got 48x48"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))
  # A fixed sin-cos embedding takes any multiple of the patch size.
  sincos = models.create("vit_tiny_patch16_224", posemb="sincos2d", **TINY)
  params = init(sincos)[0]
  assert sincos.apply(params, jnp.zeros((1, 48, 64, 3))).shape == (1, 10)


def test_registry_names_errors_and_overrides():
  assert "vit_base_patch16_224" in models.list_models()
  assert models.list_models("vit_*_patch14_*") == [
      "vit_base_patch14_224", "vit_huge_patch14_224", "vit_large_patch14_224",
      "vit_large_patch14_clip_224", "vit_small_patch14_224", "vit_tiny_patch14_224"]
  with pytest.raises(ValueError, match="Close matches: vit_base_patch16_224"):
    models.create("vit_base_patch61_224")
  model = models.create("vit_small_patch16_384", num_classes=7)
  assert (model.hidden_size, model.patch_size, model.image_size, model.num_classes) == (
      384, 16, 384, 7)
  assert models.input_shape("vit_small_patch16_384", batch=4) == (4, 384, 384, 3)


TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                 mlp_ratio=2.0, num_classes=10)


def test_matches_timm_with_random_weights(timm_reference):
  """timm ViT (class token, and MAP pooling) with random weights -> same logits."""
  images = np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32)
  token, map_pool = timm_reference([
      {"model": "vit_tiny_patch16_224", "kwargs": TIMM_TINY, "images": images,
       "randomize": 0.2},
      {"model": "vit_tiny_patch16_224", "images": images, "randomize": 0.2,
       "kwargs": {**TIMM_TINY, "class_token": False, "global_pool": "map"}},
  ])
  for ref, classifier in ((token, "token"), (map_pool, "map")):
    model = models.create("vit_tiny_patch16_224", classifier=classifier, **TINY)
    params = convert.from_timm("vit_tiny_patch16_224", state_dict_of(ref), model=model)
    logits = model.apply({"params": params}, images)
    assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1, not ~0
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    assert models.param_count("vit_tiny_patch16_224", classifier=classifier,
                              **TINY) == int(ref["num_params"])


def test_timm_conversion_names_bad_keys(timm_reference):
  images = np.zeros((1, 32, 32, 3), np.float32)
  (ref,) = timm_reference([{"model": "vit_tiny_patch16_224", "kwargs": TIMM_TINY,
                            "images": images}])
  state = state_dict_of(ref)
  state["extra.weight"] = np.zeros(3)
  with pytest.raises(convert.ConversionError, match="unexpected: extra.weight"):
    convert.from_timm("vit_tiny_patch16_224", state, **TINY)
  del state["extra.weight"]
  with pytest.raises(convert.ConversionError,
                     match=r"shape mismatch: head/bias: expected \(5,\), found \(10,\), "
                           r"head/kernel: expected \(32, 5\), found \(32, 10\)"):
    convert.from_timm("vit_tiny_patch16_224", state, **{**TINY, "num_classes": 5})
  del state["blocks.1.norm2.bias"]
  with pytest.raises(convert.ConversionError, match="no entry 'blocks.1.norm2.bias'"):
    convert.from_timm("vit_tiny_patch16_224", state, **TINY)
