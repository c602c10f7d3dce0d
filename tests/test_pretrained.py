"""Pretrained weights in one call (``models.create(name, pretrained=True | "tag")``):
an offline Hub cache -> download -> convert -> timm.

The Hub is never reached: ``hub_cache`` lays files out as huggingface_hub's cache does
(``models--ORG--REPO/refs/main`` naming a commit, ``snapshots/<commit>/FILE``) and
turns on HF_HUB_OFFLINE. The files hold random weights of timm / open_clip models
written by ONE torch subprocess (``open_clip_ref.py``, which hands timm jobs to
``timm_ref.py``), which also runs timm's and open_clip's eval transforms on two test
images. To keep the CPU compiles short the models keep their real names and widths
with fewer blocks: ViT-B/16 with 2 of 12, Swin-T with depths (1, 1, 2, 1), open_clip
ViT-B-32 with 2 per tower; EfficientViT-M0 (BatchNorm) is full size.
"""

import hashlib
import io
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow as tf
from huggingface_hub import constants
from PIL import Image
from safetensors.numpy import save_file

from helpers import run_timm_reference, state_dict_of
from vit_jax import models, weights
from vit_jax.data import preprocess
from vit_jax.models import convert
from vit_jax.weights import files, pretrained

VIT = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
SWIN = "swin_tiny_patch4_window7_224.ms_in1k"
EFFVIT = "efficientvit_m0.r224_in1k"
CLIP = ("clip_vit_base_patch32_224.laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k")
# name.tag -> (timm model kwargs, our create() overrides): the same shallower model.
CLASSIFIERS = {
    VIT: ({"depth": 2}, {"num_layers": 2}),
    SWIN: ({"depths": (1, 1, 2, 1)}, {"depths": (1, 1, 2, 1)}),
    EFFVIT: ({}, {}),
}
CLIP_LAYERS = 2
CLIP_KWARGS = {"vision_cfg": {"image_size": 224, "layers": CLIP_LAYERS, "width": 768,
                              "patch_size": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512,
                            "heads": 8, "layers": CLIP_LAYERS}}
CLIP_OVERRIDES = {"image": {"num_layers": CLIP_LAYERS}, "text": {"num_layers": CLIP_LAYERS}}
IMAGE_SIZES = ((301, 389), (389, 263))  # landscape and portrait, odd crop margins


def put_in_hub_cache(cache: str, repo_id: str, filename: str, state: dict) -> str:
  """Writes ``state`` as huggingface_hub's cache holds a downloaded file; its commit."""
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
  with open(os.path.join(folder, "refs", "main"), "w") as f:
    f.write(commit)
  os.makedirs(os.path.join(folder, "snapshots", commit), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(folder, "snapshots", commit, filename))
  return commit


def noisy_image(height: int, width: int, seed: int) -> np.ndarray:
  """Smooth colour blobs plus pixel noise: resampling differences show."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
  return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """The references, and a Hub cache holding their files with the Hub switched off."""
  directory = tmp_path_factory.mktemp("pretrained")
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  tokens = np.zeros((2, 77), np.int64)
  tokens[:, 0], tokens[0, 1:5], tokens[0, 5] = 49406, [320, 1125, 539, 320], 49407
  tokens[1, 1:3], tokens[1, 3] = [1929, 2368], 49407
  np.save(directory / "tokens.npy", tokens)
  pngs = []
  for i, (height, width) in enumerate(IMAGE_SIZES):
    buffer = io.BytesIO()
    Image.fromarray(noisy_image(height, width, i)).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
    (directory / f"image{i}.png").write_bytes(pngs[-1])
  jobs = [{"kind": "timm", "model": name.split(".")[0], "kwargs": kwargs, "images": images,
           "randomize": 0.05} for name, (kwargs, _) in CLASSIFIERS.items()]
  jobs.append({"model": CLIP[1], "kwargs": CLIP_KWARGS, "images": images,
               "tokens": str(directory / "tokens.npy"), "randomize": 0.02})
  transforms = [{"timm": name} for name in CLASSIFIERS] + [{"open_clip": list(CLIP[1:])}]
  jobs += [{"transform": t, "image": str(directory / f"image{i}.png")}
           for t in transforms for i in range(len(IMAGE_SIZES))]
  outputs = run_timm_reference(jobs, directory, script="open_clip_ref.py")
  cache = str(directory / "hub")
  commits = {}
  for name, out in zip(list(CLASSIFIERS) + [CLIP[0]], outputs):
    info = pretrained.pretrained_info(name)
    commits[name] = put_in_hub_cache(cache, info.hub, info.files[0], state_dict_of(out))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(constants, "HF_HUB_CACHE", cache)
    patch.setattr(constants, "HF_HUB_OFFLINE", True)
    patch.setenv("HF_HUB_OFFLINE", "1")
    yield {"cache": cache, "commits": commits, "images": images, "tokens": tokens,
           "pngs": pngs, "outputs": dict(zip(list(CLASSIFIERS) + [CLIP[0]], outputs)),
           "transforms": dict(zip([(str(t), i) for t in transforms
                                   for i in range(len(IMAGE_SIZES))],
                                  outputs[len(CLASSIFIERS) + 1:]))}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_pretrained_tag_gives_timm_logits(hub, name):
  arch, tag = name.split(".")
  # Every spelling of the one call: weights.pretrained.create, and models.create with
  # pretrained=True (EfficientViT-M0 by its default tag: timm's first) or a tag.
  if name == VIT:
    model = pretrained.create(arch, tag, **CLASSIFIERS[name][1])
  else:
    model = models.create(arch, pretrained=True if name == EFFVIT else tag,
                          **CLASSIFIERS[name][1])
  assert pretrained.pretrained_info("efficientvit_m0").tag == EFFVIT.split(".")[1]
  module, variables = model.unbind()
  logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, hub["images"])
  expected = hub["outputs"][name]["logits"]
  diff = np.abs(np.asarray(logits) - expected).max()
  print(name, f"max |logit diff| {diff:.1e}, mean |logit| {np.abs(expected).mean():.2f}")
  assert logits.shape == expected.shape == (2, 1000)
  assert diff < 1e-4
  assert np.abs(expected).mean() > 0.1, "reference logits near zero"
  if name == EFFVIT:
    assert set(variables) == {"params", "batch_stats"}
  if name == VIT:  # the bound model runs as it is (eagerly: one image)
    np.testing.assert_allclose(model(hub["images"][:1], train=False), expected[:1],
                               atol=1e-4)


def test_open_clip_tower_pair_gives_open_clip_embeddings(hub):
  model = pretrained.create(CLIP[0], **CLIP_OVERRIDES)  # the name.tag form
  module, variables = model.unbind()
  _, _, out = jax.jit(lambda v, x, t: module.apply(v, x, t))(
      variables, hub["images"], hub["tokens"].astype(np.int32))
  ref = hub["outputs"][CLIP[0]]
  for ours, theirs in (("img/embedding", "image_embedding"),
                       ("txt/embedding", "text_embedding")):
    diff = np.abs(np.asarray(out[ours]) - ref[theirs]).max()
    print(theirs, f"max diff {diff:.1e}, mean |x| {np.abs(ref[theirs]).mean():.2f}")
    assert diff < 1e-4 and np.abs(ref[theirs]).mean() > 0.05


def test_pp_eval_preprocesses_like_timm_and_open_clip(hub):
  names = {str({"timm": name}): name for name in CLASSIFIERS}
  names[str({"open_clip": list(CLIP[1:])})] = CLIP[0]
  for (key, i), ref in hub["transforms"].items():
    info = pretrained.pretrained_info(names[key])
    image = preprocess.parse(info.pp_eval)({"image": tf.constant(hub["pngs"][i])})["image"]
    # Both normalised: back to pixel levels before comparing.
    diff = np.abs(np.asarray(image) - ref["output"]) * np.asarray(info.std) * 255
    print(names[key], IMAGE_SIZES[i], info.pp_eval, f"max {diff.max():.3f}/255, "
          f"mean {diff.mean():.4f}/255")
    assert image.shape == ref["output"].shape == (info.size, info.size, 3)
    assert diff.max() <= 1 + 1e-4, (names[key], diff.max())


def test_hf_hub_scheme_is_the_config_init_path(hub):
  """``--config.init=hf-hub:...``: weights.load on a new head, every form of the source."""
  info = pretrained.pretrained_info(VIT)
  commit = hub["commits"][VIT]
  expected = os.path.join(hub["cache"], "models--" + info.hub.replace("/", "--"),
                          "snapshots", commit, "model.safetensors")
  for source in (info.source, f"{info.source}/model.safetensors",
                 f"{info.source}@{commit}", f"{info.source}@{commit}/model.safetensors"):
    assert os.path.realpath(files.local_path(source)) == os.path.realpath(expected), source
  model = models.create("vit_base_patch16_224", num_classes=10, num_layers=2)
  abstract = jax.eval_shape(model.init, jax.random.key(1), np.zeros((1, 224, 224, 3)))
  # Values only where the new head needs them: initialising all of ViT-B costs seconds.
  head = {"kernel": np.full((768, 10), 0.5, np.float32), "bias": np.zeros(10, np.float32)}
  fresh = {"params": {**abstract["params"], "head": head}}
  variables, report = weights.load(info.source, model, fresh,
                                   model_name="vit_base_patch16_224")
  assert sorted(report.reinitialised) == ["head/bias (1000,) -> (10,)",
                                          "head/kernel (768, 1000) -> (768, 10)"]
  np.testing.assert_array_equal(variables["params"]["embedding"]["bias"],
                                hub["outputs"][VIT]["state/patch_embed.proj.bias"])
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], head["kernel"])
  with pytest.raises(weights.LoadError, match="leaves head/bias, head/kernel to the "
                     "fresh initialisation"):
    weights.load(info.source, model, abstract, model_name="vit_base_patch16_224")


def test_models_create_pretrained_spellings(monkeypatch):
  """models.create(pretrained=...) and the re-exports call weights.pretrained (which
  test_pretrained_tag_gives_timm_logits runs end to end through models.create)."""
  calls = []

  def load(name, tag=None, *, seed=0, **overrides):
    calls.append((name, tag, seed, overrides))
    return nn.Dense(2, use_bias=False), {"params": {"kernel": np.full((1, 2), len(calls),
                                                                  np.float32)}}

  monkeypatch.setattr(pretrained, "load", load)  # pretrained.create binds what it loads
  kernel = lambda variables: float(variables["params"]["kernel"][0, 0])
  assert kernel(models.create(EFFVIT, pretrained=True).variables) == 1
  bound = models.create("efficientvit_m0", pretrained="r224_in1k", num_classes=7)
  assert kernel(bound.variables) == 2 and bound(np.ones((1, 1))).shape == (1, 2)
  assert kernel(models.load_pretrained("efficientvit_m0", seed=3, num_classes=5)) == 3
  assert calls == [(EFFVIT, None, 0, {}), ("efficientvit_m0", "r224_in1k", 0,
                                           {"num_classes": 7}),
                   ("efficientvit_m0", None, 3, {"num_classes": 5})]
  plain = models.create("efficientvit_m0", pretrained=False, num_classes=7)
  assert plain.num_classes == 7 and plain.scope is None and len(calls) == 3  # no weights
  assert models.list_pretrained("swin_*") == pretrained.list_pretrained("swin_*")
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"pretrained=1\): pretrained takes True \(the "
                     r"default tag\), a tag name or False"):
    models.create("efficientvit_m0", pretrained=1)
  with pytest.raises(ValueError, match="two tags for efficientvit_m0: 'r224_in1k' .*'x'"):
    models.create(EFFVIT, pretrained="x")


def test_list_pretrained_covers_the_timm_families_and_two_towers():
  listed = pretrained.list_pretrained()
  assert VIT in listed and SWIN in listed and EFFVIT in listed and CLIP[0] in listed
  assert pretrained.list_pretrained("swin_tiny_patch4_window7_224.*")[0] == SWIN
  families = {models.model_info(n.split(".")[0]).family for n in listed}
  # timm keeps GC ViT's weights at GitHub release URLs, not on the Hub.
  assert families == set(convert.families_with("timm")) - {"gcvit"} | {"two_tower"}
  for name in listed:  # every tag's pp string parses
    preprocess.parse(pretrained.pretrained_info(name).pp_eval)


def test_errors_name_what_is_wrong(hub):
  with pytest.raises(ValueError, match=r"no pretrained tag 'in1k'; its tags: "
                     r"augreg2_in21k_ft_in1k, augreg_in21k_ft_in1k, .*\(default "
                     r"augreg2_in21k_ft_in1k\)"):
    pretrained.create("vit_base_patch16_224", "in1k")
  with pytest.raises(ValueError, match="unknown model 'vit_bse_patch16_224'.*Close "
                     "matches: vit_base_patch16_224"):
    pretrained.load_pretrained("vit_bse_patch16_224")
  with pytest.raises(ValueError, match="vit_huge_patch16_224 has no pretrained weights"):
    pretrained.create("vit_huge_patch16_224")
  with pytest.raises(weights.LoadError, match=r"HF_HUB_OFFLINE is set and the Hub cache "
                     r"\(.*\) has no model.safetensors or pytorch_model.bin of "
                     r"timm/vit_small_patch16_224.augreg_in21k_ft_in1k"):
    pretrained.create("vit_small_patch16_224")
  with pytest.raises(weights.LoadError, match="expected hf-hub:ORG/REPO"):
    files.local_path("hf-hub:timm")
  # A file of another shape under a tag's repository: the shapes are named.
  state = state_dict_of(hub["outputs"][VIT])
  state["blocks.1.mlp.fc1.weight"] = state["blocks.1.mlp.fc1.weight"][:1536]
  state["blocks.1.mlp.fc1.bias"] = state["blocks.1.mlp.fc1.bias"][:1536]
  info = pretrained.pretrained_info("vit_base_patch16_224", "augreg_in1k")
  put_in_hub_cache(hub["cache"], info.hub, "model.safetensors", state)
  with pytest.raises(weights.LoadError, match=r"does not fit this model.*"
                     r"encoderblock_1/MlpBlock_3/Dense_0/kernel: checkpoint \(768, 1536\), "
                     r"model \(768, 3072\)"):
    pretrained.create("vit_base_patch16_224", "augreg_in1k", num_layers=2)
