"""Text tower and two-tower models: counts, masks, pooling, errors, open_clip parity.

The references run in ONE subprocess (``open_clip_ref.py``; torch never meets TF):
a randomly initialised open_clip ViT-B-32 at full size (weights perturbed so biases
and norms are not trivial), and timm's ``vit_base_patch32_clip_224`` image tower with
2 of its 12 blocks (real widths and heads; depth cut to keep the CPU compile short).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, state_dict_of, subprocess_env
from vit_jax import models
from vit_jax.models import convert, two_tower
from vit_jax.models.text import TextTransformer

# open_clip 3.3's sum(p.numel()) of create_model("ViT-B-32" / "ViT-B-16" / "ViT-L-14")
# (random init), computed once in a separate process.
OPEN_CLIP_PARAM_COUNTS = {
    "clip_vit_base_patch32_224": 151_277_313,
    "clip_vit_base_patch16_224": 149_620_737,
    "clip_vit_large_patch14_224": 427_616_513,
}
TINY_TEXT = dict(vocab_size=50, context_length=8, hidden_size=32, num_layers=2,
                 num_heads=4, mlp_dim=64)
TINY_IMAGE = dict(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=4,
                  mlp_dim=64)


def tokens_with_eot(lengths, context=8, eot=3, seed=0):
  """SOT(2), random ids in [5, 50), EOT, then padding (0)."""
  rng = np.random.default_rng(seed)
  out = np.zeros((len(lengths), context), np.int32)
  for i, n in enumerate(lengths):
    out[i, 0] = 2
    out[i, 1:n] = rng.integers(5, 50 if eot < 5 else eot, n - 1)
    out[i, n] = eot
  return out


# ---------------------------------------------------------------- references (subprocess)

@pytest.fixture(scope="module")
def references(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("open_clip"))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
  tokens = np.zeros((3, 77), np.int64)
  for i, n in enumerate((4, 30, 76)):  # the last fills the whole context
    tokens[i, 0] = 49406
    tokens[i, 1:n] = rng.integers(1, 49000, n - 1)
    tokens[i, n] = 49407  # OpenAI's end-of-text: the largest id
  paths = {name: os.path.join(directory, f"{name}.npy") for name in ("images", "tokens")}
  np.save(paths["images"], images)
  np.save(paths["tokens"], tokens)
  jobs = [
      {"model": "ViT-B-32", "images": paths["images"], "tokens": paths["tokens"],
       "out": os.path.join(directory, "open_clip.npz"), "randomize": 0.02},
      {"kind": "timm", "model": "vit_base_patch32_clip_224", "kwargs": {"depth": 2},
       "input": paths["images"], "out": os.path.join(directory, "timm.npz"),
       "randomize": 0.1},
  ]
  jobs_file = os.path.join(directory, "jobs.json")
  with open(jobs_file, "w") as f:
    json.dump(jobs, f)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "open_clip_ref.py"),
                         jobs_file], env=subprocess_env(), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return {"images": images, "tokens": tokens.astype(np.int32),
          "open_clip": dict(np.load(jobs[0]["out"])), "timm": dict(np.load(jobs[1]["out"]))}


def test_open_clip_vit_b32_parity(references):
  ref = references["open_clip"]
  model, params = two_tower.from_open_clip(state_dict_of(ref), "clip_vit_base_patch32_224")
  zimg, ztxt, out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(
      params, references["images"], references["tokens"])
  assert int(ref["num_params"]) == OPEN_CLIP_PARAM_COUNTS["clip_vit_base_patch32_224"]
  for ours, theirs in (("img/embedding", "image_embedding"),
                       ("txt/embedding", "text_embedding")):
    assert 0.1 < np.abs(ref[theirs]).mean() < 10  # embeddings of order 1
    np.testing.assert_allclose(out[ours], ref[theirs], atol=1e-4, rtol=0, err_msg=ours)
  np.testing.assert_allclose(zimg, ref["image_normalized"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(ztxt, ref["text_normalized"], atol=1e-4, rtol=0)
  assert float(out["logit_scale"]) == pytest.approx(np.log(1 / 0.07))


def test_timm_clip_image_tower_parity(references):
  ref = references["timm"]
  params = convert.from_timm("vit_base_patch32_clip_224", state_dict_of(ref), num_layers=2)
  model = models.create("vit_base_patch32_clip_224", num_layers=2)
  logits = model.apply({"params": params}, references["images"])
  assert np.abs(ref["logits"]).max() > 0.1
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_open_clip_conversion_names_bad_keys(references):
  state = state_dict_of(references["open_clip"])
  broken = {k: v for k, v in state.items() if k != "visual.ln_pre.weight"}
  with pytest.raises(convert.ConversionError, match="visual.ln_pre.weight"):
    two_tower.from_open_clip(broken)
  extra = dict(state, **{"visual.extra_thing": np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match="unexpected: visual.extra_thing"):
    two_tower.from_open_clip(extra)
  wrong = dict(state, positional_embedding=state["positional_embedding"][:70])
  with pytest.raises(convert.ConversionError, match="txt/Transformer/posembed_input"):
    two_tower.from_open_clip(wrong)


# ---------------------------------------------------------------- counts

@pytest.mark.parametrize("name", sorted(OPEN_CLIP_PARAM_COUNTS))
def test_named_two_tower_param_counts_equal_open_clip(name):
  assert models.param_count(name) == OPEN_CLIP_PARAM_COUNTS[name]


def test_two_tower_models_are_registered():
  assert models.list_models(family="two_tower") == sorted(OPEN_CLIP_PARAM_COUNTS)


# ---------------------------------------------------------------- text tower

@pytest.fixture(scope="module")
def text_variables():
  model = TextTransformer(**TINY_TEXT, eot_id=3)
  return model.init(jax.random.key(0), tokens_with_eot([3]))


def test_causal_eot_pooling_ignores_what_follows_the_eot(text_variables):
  model = TextTransformer(**TINY_TEXT, eot_id=3)
  tokens = tokens_with_eot([3, 5])
  out = model.apply(text_variables, tokens)
  assert out.shape == (2, 32) and out.dtype == jnp.float32
  later = tokens.copy()
  later[:, 6:] = 7  # after every EOT
  np.testing.assert_allclose(model.apply(text_variables, later), out, atol=1e-6)
  earlier = tokens.copy()
  earlier[:, 1] = 9  # before the EOT: the features change
  assert not np.allclose(model.apply(text_variables, earlier), out, atol=1e-4)
  # Without eot_id the last non-padding token is the EOT here: same features.
  no_id = TextTransformer(**TINY_TEXT)
  np.testing.assert_allclose(no_id.apply(text_variables, tokens), out, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "map", "eot"])
def test_padding_never_reaches_the_features(pool):
  model = TextTransformer(**TINY_TEXT, pool=pool, causal=pool == "eot")
  tokens = tokens_with_eot([2, 4, 7])
  variables = model.init(jax.random.key(1), tokens)
  out = model.apply(variables, tokens)
  # Change the embedding of the padding id: no output may move. (A random change: a
  # constant added to every channel is removed by the LayerNorms whatever the masking.)
  params = jax.tree.map(lambda x: x, variables["params"])
  table = params["token_embedding"]["embedding"]
  change = 5.0 * jax.random.normal(jax.random.key(2), table.shape[1:])
  params["token_embedding"]["embedding"] = table.at[0].add(change)
  np.testing.assert_allclose(model.apply({"params": params}, tokens), out, atol=1e-5)
  # But the sequences' own tokens matter.
  params["token_embedding"]["embedding"] = table.at[tokens[0, 1]].add(change)
  assert not np.allclose(model.apply({"params": params}, tokens)[0], out[0], atol=1e-4)


def test_argmax_pooling_takes_the_largest_token_id():
  model = TextTransformer(**TINY_TEXT, pool="argmax", causal=False)
  tokens = tokens_with_eot([4], eot=49)
  variables = model.init(jax.random.key(0), tokens)
  _, state = model.apply(variables, tokens, mutable=["intermediates"])
  tokens_out = state["intermediates"]["Transformer"]["block_1"][0]
  features = state["intermediates"]["features"][0]
  norm = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  scale = variables["params"]["Transformer"]["encoder_norm"]
  expected = norm(np.asarray(tokens_out[0, 4])) * scale["scale"] + scale["bias"]
  np.testing.assert_allclose(features[0], expected, atol=1e-4)


def test_text_tower_errors():
  model = TextTransformer(**TINY_TEXT)
  with pytest.raises(ValueError, match="context_length=8 tokens .* got 5"):
    model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="pool must be one of"):
    TextTransformer(**TINY_TEXT, pool="cls").init(jax.random.key(0),
                                                  jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="token ids must be integers"):
    model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.float32))


# ---------------------------------------------------------------- two towers

def tiny_two_tower(**overrides):
  settings = dict(image_model="vit_tiny_patch16_224", image=TINY_IMAGE,
                  text=dict(TINY_TEXT, eot_id=3), embed_dim=16)
  settings.update(overrides)
  return models.create("clip_vit_base_patch32_224", **settings)


def test_two_tower_layout_embeddings_and_partial_inputs():
  model = tiny_two_tower(logit_bias_init=-10.0)
  variables = model.init(jax.random.key(0))  # no inputs: both towers anyway
  params = variables["params"]
  assert sorted(params) == ["img", "img_projection", "logit_bias", "logit_scale", "txt",
                            "txt_projection"]
  assert params["img_projection"]["kernel"].shape == (32, 16)
  assert "bias" not in params["txt_projection"]
  assert params["txt"]["token_embedding"]["embedding"].shape == (50, 32)
  assert float(params["logit_bias"]) == -10.0
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  tokens = tokens_with_eot([2, 3, 5])
  zimg, ztxt, out = model.apply(variables, images, tokens)
  assert zimg.shape == ztxt.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, atol=1e-5)
  assert float(out["logit_bias"]) == -10.0
  only_images, none, _ = model.apply(variables, images=images)
  assert none is None
  np.testing.assert_allclose(only_images, zimg, atol=1e-6)
  none, only_texts, _ = model.apply(variables, texts=tokens)
  assert none is None
  np.testing.assert_allclose(only_texts, ztxt, atol=1e-6)


def test_any_registered_image_tower_can_be_used():
  model = tiny_two_tower(image=dict(TINY_IMAGE, classifier="map"))
  variables = model.init(jax.random.key(0))
  assert "MAPHead_0" in variables["params"]["img"]
  zimg, _, _ = model.apply(variables, images=jnp.ones((2, 16, 16, 3)))
  assert zimg.shape == (2, 16)


def test_two_tower_errors():
  with pytest.raises(ValueError, match="text tower has no setting 'num_layer' .*num_layers"):
    tiny_two_tower(text=dict(TINY_TEXT, num_layer=3)).init(jax.random.key(0))
  with pytest.raises(ValueError, match="unknown model 'vit_nonexistent'"):
    tiny_two_tower(image_model="vit_nonexistent").init(jax.random.key(0))
  with pytest.raises(ValueError, match="has no setting 'temperature'"):
    models.create("clip_vit_base_patch32_224", temperature=1.0)
  model = tiny_two_tower()
  variables = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match="needs image sides divisible by 8"):
    model.apply(variables, images=jnp.ones((1, 12, 12, 3)))


def test_open_clip_checkpoint_initialises_its_image_tower(references, tmp_path):
  """weights.load (the fine-tuning path) reads an open_clip file into the CLIP ViT."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from vit_jax import tree, weights  # pylint: disable=g-import-not-at-top
  state = state_dict_of(references["open_clip"])
  path = str(tmp_path / "open_clip.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  _, expected = two_tower.from_open_clip(state, "clip_vit_base_patch32_224")

  model = models.create("vit_base_patch32_clip_224", num_classes=5)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  fresh = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract)
  variables, report = weights.load(path, model, fresh,
                                   model_name="vit_base_patch32_clip_224")
  assert report.format == "open_clip state dict (image tower)"
  assert sorted(report.reinitialised) == ["head/bias", "head/kernel"]
  assert not (report.missing or report.unexpected or report.mismatched)
  loaded = tree.flatten(variables["params"])
  for name, value in tree.flatten(expected["img"]).items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  np.testing.assert_array_equal(loaded["head/kernel"], 0.5)  # the fresh head

  wrong = models.create("vit_base_patch16_clip_224", num_classes=5)
  with pytest.raises(weights.LoadError, match="does not fit clip_vit_base_patch16_224"):
    weights.load(path, wrong, fresh, model_name="vit_base_patch16_clip_224")
  with pytest.raises(weights.LoadError, match="its image tower loads into one of"):
    weights.load(path, models.create("vit_base_patch32_224"), fresh,
                 model_name="vit_base_patch32_224")
