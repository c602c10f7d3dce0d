"""Weight interop: position-table resampling vs timm, loading any format, export to timm.

One timm subprocess (module fixture) computes every reference: timm's
``resample_abs_pos_embed`` and ``resize_rel_pos_bias_table_simple`` on random tables,
a randomised timm ViT (its state dict goes through ``.safetensors`` into vit_jax),
and timm ViTs that load the files vit_jax exported (``.npz`` through timm's own
vision_transformer ``.npz`` loader, ``.safetensors`` through ``load_checkpoint``).
The ViT keeps ViT-S's real width and heads (384, 6) with depth 2 and 64x64 inputs
so that it compiles quickly on a CPU.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import run_timm_reference, state_dict_of
from vit_jax import export, init_from, models, tree, weights
from vit_jax.weights import resample

SMALL = dict(num_layers=2, image_size=64, num_classes=10)
TIMM_SMALL = dict(depth=2, img_size=64, num_classes=10)
NAME = "vit_small_patch16_224"

POSEMB_CASES = [  # (old grid, new grid, method, antialias)
    ((7, 7), (12, 12), "bicubic", True),
    ((14, 14), (9, 9), "bicubic", True),
    ((4, 4), (6, 5), "bicubic", True),
    ((7, 7), (12, 12), "bilinear", False),
    ((14, 14), (9, 9), "bilinear", False),
    ((6, 6), (10, 10), "bicubic", False),
    ((5, 5), (8, 8), "bilinear", True),
]
TABLE_CASES = [((7, 7), (12, 12), 2), ((12, 12), (7, 7), 3)]  # windows, layout ndim


def _randomize(params, seed, scale=0.1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  d = tmp_path_factory.mktemp("interop")
  rng = np.random.RandomState(0)
  jobs, cases = [], []
  for old, new, method, aa in POSEMB_CASES:
    x = rng.randn(1, 1 + old[0] * old[1], 16).astype(np.float32)
    jobs.append({"function": "resample_abs_pos_embed", "images": x,
                 "kwargs": dict(new_size=list(new), old_size=list(old),
                                num_prefix_tokens=1, interpolation=method,
                                antialias=aa)})
    cases.append(x)
  for old, new, ndim in TABLE_CASES:
    s = 2 * old[0] - 1
    x = rng.randn(*((s * s, 3) if ndim == 2 else (3, s, s))).astype(np.float32)
    t = 2 * new[0] - 1
    jobs.append({"function": "resize_rel_pos_bias_table_simple", "images": x,
                 "kwargs": dict(new_window_size=list(new),
                                new_bias_shape=[t * t, 3] if ndim == 2 else [3, t, t])})
    cases.append(x)

  # Our randomised ViT, exported both ways, loaded by timm.
  model = models.create(NAME, **SMALL)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  params = _randomize(model.init(jax.random.key(0), images)["params"], 2)
  export.to_npz(params, str(d / "ours.npz"))
  export.to_safetensors(NAME, params, str(d / "ours.safetensors"), **SMALL)
  big = np.asarray(jax.random.normal(jax.random.key(3), (2, 96, 96, 3)))
  jobs += [
      {"model": NAME, "kwargs": TIMM_SMALL, "images": np.asarray(images),
       "randomize": 0.1, "seed": 4},
      {"model": NAME, "kwargs": TIMM_SMALL, "images": np.asarray(images),
       "load": str(d / "ours.npz")},
      {"model": NAME, "kwargs": TIMM_SMALL, "images": np.asarray(images),
       "load": str(d / "ours.safetensors")},
      # timm's .npz loader at another resolution: it resamples (bilinear, no antialias).
      {"model": NAME, "kwargs": dict(TIMM_SMALL, img_size=96), "images": big,
       "load": str(d / "ours.npz")},
  ]
  outs = run_timm_reference(jobs, d)
  return dict(dir=d, cases=cases, outs=outs, model=model, params=params, images=images,
              big=big)


@pytest.mark.parametrize("i", range(len(POSEMB_CASES)))
def test_posemb_resampling_matches_timm(ref, i):
  old, new, method, aa = POSEMB_CASES[i]
  ours = resample.resample_posemb(ref["cases"][i], new, old_size=old, method=method,
                                  antialias=aa)
  expected = ref["outs"][i]["output"]
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(ours[:, :1], ref["cases"][i][:, :1])  # class token kept


@pytest.mark.parametrize("j", range(len(TABLE_CASES)))
def test_rel_pos_table_resize_matches_timm(ref, j):
  i = len(POSEMB_CASES) + j
  _, new, _ = TABLE_CASES[j]
  ours = resample.resize_rel_pos_bias_table(ref["cases"][i], new)
  np.testing.assert_allclose(ours, ref["outs"][i]["output"], atol=1e-5, rtol=0)


def _timm_out(ref, k):
  return ref["outs"][len(POSEMB_CASES) + len(TABLE_CASES) + k]


def test_timm_safetensors_loads_with_equal_logits(ref, tmp_path):
  out = _timm_out(ref, 0)
  path = str(tmp_path / "timm.safetensors")
  save_file(state_dict_of(out), path)
  model = ref["model"]
  fresh = model.init(jax.random.key(9), ref["images"])
  variables, report = weights.load(path, model, fresh, model_name=NAME)
  assert not report.missing and not report.unexpected and not report.reinitialised
  logits = model.apply(variables, ref["images"])
  assert np.abs(out["logits"]).max() > 0.3  # logits of order 1
  np.testing.assert_allclose(logits, out["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("k,fmt", [(1, "npz"), (2, "safetensors")])
def test_export_loads_into_timm_with_equal_logits(ref, k, fmt):
  ours = ref["model"].apply({"params": ref["params"]}, ref["images"])
  theirs = _timm_out(ref, k)["logits"]
  assert np.abs(ours).max() > 0.3
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=fmt)


def test_npz_at_new_resolution_matches_timm_npz_loader(ref):
  """Both resample the exported embedding (4x4 -> 6x6) as timm's .npz loader does."""
  model = models.create(NAME, **dict(SMALL, image_size=96))
  fresh = model.init(jax.random.key(0), ref["big"][:1])
  variables, report = weights.load(
      str(ref["dir"] / "ours.npz"), model, fresh, posemb_method="bilinear",
      posemb_antialias=False)
  assert report.resampled == ["Transformer/posembed_input/pos_embedding "
                              "(1, 17, 384) -> (1, 37, 384)"]
  np.testing.assert_allclose(model.apply(variables, ref["big"]), _timm_out(ref, 3)["logits"],
                             atol=1e-4, rtol=0)


def test_npz_round_trip_and_new_head(ref):
  model = models.create(NAME, **dict(SMALL, num_classes=3))
  fresh = model.init(jax.random.key(0), ref["images"])
  variables, report = weights.load(str(ref["dir"] / "ours.npz"), model, fresh)
  assert sorted(report.reinitialised) == ["head/bias (10,) -> (3,)",
                                          "head/kernel (384, 10) -> (384, 3)"]
  flat, want = tree.flatten(variables["params"]), tree.flatten(ref["params"])
  for name, value in flat.items():
    if not name.startswith("head/"):
      np.testing.assert_array_equal(value, want[name], err_msg=name)
  np.testing.assert_array_equal(flat["head/kernel"], fresh["params"]["head"]["kernel"])
  # The scanned layout reads the same file.
  scanned = models.create(NAME, **dict(SMALL, scan_layers=True))
  v2, _ = weights.load(str(ref["dir"] / "ours.npz"), scanned,
                       scanned.init(jax.random.key(0), ref["images"]))
  np.testing.assert_allclose(scanned.apply(v2, ref["images"]),
                             ref["model"].apply({"params": ref["params"]}, ref["images"]),
                             atol=1e-5, rtol=0)


def test_sources_are_read_through_the_scheme_table(ref, monkeypatch):
  """A remote source (Hub, bucket) is one SCHEMES entry: a fetcher giving a local path."""
  from vit_jax.weights import files  # pylint: disable=g-import-not-at-top
  fetched = []

  def fetch(rest):
    fetched.append(rest)
    return str(ref["dir"] / rest)

  monkeypatch.setitem(files.SCHEMES, "test-hub:", fetch)
  fresh = {"params": ref["params"]}
  for source in ("test-hub:ours.npz", f"file://{ref['dir'] / 'ours.npz'}"):
    variables, report = weights.load(source, ref["model"], fresh)
    assert report.source == source and not report.reinitialised
    jax.tree.map(np.testing.assert_array_equal, variables["params"], ref["params"])
  assert fetched == ["ours.npz"]
  with pytest.raises(FileNotFoundError, match="no weights at .*missing.npz"):
    weights.load("test-hub:missing.npz", ref["model"], fresh)
  assert init_from.load is weights.load  # init_from: aliases for existing callers


def test_big_vision_layout_npz(ref, tmp_path):
  """big_vision names (pos_embedding without a class slot) load into our layout."""
  flat = tree.flatten(ref["params"])
  bv = {}
  for k, v in flat.items():
    k = (k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
         .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"))
    if k.endswith("pos_embedding"):
      k, v = "pos_embedding", np.asarray(v)[:, 1:]
    bv["params/" + k] = np.asarray(v)
  np.savez(tmp_path / "bv.npz", **bv)
  model = ref["model"]
  variables, report = weights.load(str(tmp_path / "bv.npz"), model,
                                   model.init(jax.random.key(0), ref["images"]))
  pe = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(pe[:, 0], 0.0)
  np.testing.assert_array_equal(pe[:, 1:], np.asarray(flat[
      "Transformer/posembed_input/pos_embedding"])[:, 1:])
  assert len(report.resampled) == 1


def test_wrong_architecture_names_the_keys(ref):
  tiny = models.create("vit_tiny_patch16_224", **SMALL)
  fresh = tiny.init(jax.random.key(0), ref["images"])
  with pytest.raises(weights.LoadError) as e:
    weights.load(str(ref["dir"] / "ours.npz"), tiny, fresh)
  assert "shape mismatch" in str(e.value)
  assert "Transformer/encoderblock_0/LayerNorm_0/scale: checkpoint (384,), model (192,)" in (
      str(e.value))
  deeper = models.create(NAME, **dict(SMALL, num_layers=3))
  with pytest.raises(weights.LoadError, match=r"missing: .*encoderblock_2/LayerNorm_0"):
    weights.load(str(ref["dir"] / "ours.npz"), deeper,
                 deeper.init(jax.random.key(0), ref["images"]))
  # Asked for explicitly, a partial load fills the rest from the fresh init and says so.
  variables, report = weights.load(str(ref["dir"] / "ours.npz"), deeper,
                                   deeper.init(jax.random.key(0), ref["images"]),
                                   allow_partial=True)
  assert any("encoderblock_2" in m for m in report.missing)
  assert "missing (fresh init)" in report.summary()
  shallow = models.create(NAME, **dict(SMALL, num_layers=1))
  with pytest.raises(weights.LoadError, match=r"unexpected: .*encoderblock_1"):
    weights.load(str(ref["dir"] / "ours.npz"), shallow,
                 shallow.init(jax.random.key(0), ref["images"]))


def test_wrong_timm_architecture_and_truncated_files(ref, tmp_path):
  out = _timm_out(ref, 0)
  state = state_dict_of(out)
  del state["blocks.1.attn.qkv.weight"]
  path = str(tmp_path / "bad.safetensors")
  save_file(state, path)
  model = ref["model"]
  fresh = model.init(jax.random.key(0), ref["images"])
  with pytest.raises(weights.LoadError, match="blocks.1.attn.qkv.weight"):
    weights.load(path, model, fresh, model_name=NAME)
  state = state_dict_of(out)
  state["extra.weight"] = np.zeros(3, np.float32)
  save_file(state, path)
  with pytest.raises(weights.LoadError, match=r"unexpected: .*timm:extra.weight"):
    weights.load(path, model, fresh, model_name=NAME)
  save_file({"visual.conv1.weight": np.zeros((2, 3, 4, 4), np.float32),
             "token_embedding.weight": np.zeros((5, 2), np.float32)}, path)
  with pytest.raises(weights.LoadError, match="open_clip"):
    weights.load(path, model, fresh, model_name=NAME)
  for name in ("ours.npz", "ours.safetensors"):
    data = open(ref["dir"] / name, "rb").read()
    cut = tmp_path / ("cut_" + name)
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.LoadError, match="truncated"):
      weights.load(str(cut), model, fresh, model_name=NAME)


def test_export_refuses_what_timm_cannot_hold(ref):
  gap = models.create(NAME, **dict(SMALL, classifier="gap"))
  params = gap.init(jax.random.key(0), ref["images"])["params"]
  with pytest.raises(ValueError, match="class-token"):
    export.to_timm_state_dict(NAME, params, **dict(SMALL, classifier="gap"))
  params = dict(ref["params"], extra={"kernel": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="no place for: extra/kernel"):
    export.to_timm_state_dict(NAME, params, **SMALL)
