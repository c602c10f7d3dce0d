"""Token reduction (ToMe, EViT, DynamicViT): parity with a PyTorch re-creation on timm,
shapes, errors.

The re-creation (``tome_ref.py``, one subprocess for every case) runs the papers'
algorithms on timm's ViT and distilled DeiT with random weights.
"""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import run_timm_reference, state_dict_of
from vit_jax import models, visualize
from vit_jax.models import convert, token_reduction
from vit_jax.tools import token_reduction_bench

# 56 px, patch 8: 49 patches; three blocks keep the compiles small. r=16 merges 16, 16
# and then (clamped to half of the 17 unprotected tokens left) 8. The schedule (24, 0,
# 30) asks for 54 merges of 49 patches, which ToMe runs: 24, 0, then clamped to 12.
TIMM_KWARGS = dict(img_size=56, patch_size=8, depth=3, num_classes=10)
OURS = dict(image_size=56, patch_size=8, num_layers=3, num_classes=10)
CASES = {  # name: (timm model, our settings)
    "vit_r0": ("vit_tiny_patch16_224", dict(token_merging=0)),
    "vit_r4": ("vit_tiny_patch16_224", dict(token_merging=4)),
    "vit_r16": ("vit_tiny_patch16_224", dict(token_merging=16)),
    "vit_schedule_clamped": ("vit_tiny_patch16_224", dict(token_merging=(24, 0, 30))),
    "deit_distilled_r16": ("deit_tiny_distilled_patch16_224", dict(token_merging=16)),
    "vit_evit": ("vit_tiny_patch16_224",
                 dict(token_keep_rate=0.7, token_keep_layers=(1, 2))),
    "deit_distilled_evit": ("deit_tiny_distilled_patch16_224",
                            dict(token_keep_rate=0.5, token_keep_layers=(0, 2))),
    # DynamicViT at inference: 49 patches, then int(0.7 * 49) = 34, int(0.49 * 49) = 24.
    "vit_dynamic": ("vit_tiny_patch16_224",
                    dict(token_pruning=0.7, token_pruning_layers=(1, 2))),
    "deit_distilled_dynamic": ("deit_tiny_distilled_patch16_224",
                               dict(token_pruning=0.5, token_pruning_layers=(0, 2))),
}


def _job(model_name, settings):
  prefix = 2 if "distilled" in model_name else 1
  merging = token_reduction.merge_schedule(settings.get("token_merging", 0), 3)
  return {"model": model_name, "kwargs": TIMM_KWARGS, "randomize": 0.2,
          "num_prefix_tokens": prefix, "token_merging": list(merging),
          "token_keep_rate": settings.get("token_keep_rate", 1.0),
          "token_keep_layers": list(settings.get("token_keep_layers", ())),
          "token_pruning": settings.get("token_pruning", 1.0),
          "token_pruning_layers": list(settings.get("token_pruning_layers", ()))}


def _with_predictors(params, ref, layers):
  """The reference's PredictorLG weights as our ``score_predictor`` parameters."""
  params = jax.tree.map(lambda x: x, params)  # a copy to add to
  for s, i in enumerate(layers):
    get = lambda name: np.asarray(ref[f"predictor/{s}/{name}"])  # pylint: disable=cell-var-from-loop
    dense = lambda name: {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}
    params["Transformer"][f"encoderblock_{i}"]["score_predictor"] = {
        "LayerNorm_0": {"scale": get("in_conv.0.weight"), "bias": get("in_conv.0.bias")},
        "Dense_0": dense("in_conv.1"), "Dense_1": dense("out_conv.0"),
        "Dense_2": dense("out_conv.2"), "Dense_3": dense("out_conv.4")}
  return params


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).randn(2, 56, 56, 3).astype(np.float32)


@pytest.fixture(scope="module")
def references(images, tmp_path_factory):
  jobs = [dict(_job(*case), images=images) for case in CASES.values()]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("tome"), script="tome_ref.py")
  return dict(zip(CASES, outputs))


def _jit_intermediates(model, traces):
  def run(params, x):
    traces.append(x.shape)
    return models.forward_intermediates(model, {"params": params}, x)
  return jax.jit(run)


@pytest.fixture(scope="module")
def ours(references):
  """``ours(case) -> (jitted forward_intermediates, params, traces)``, built once."""
  built = {}

  def get(case):
    if case not in built:
      model_name, settings = CASES[case]
      model = models.create(model_name, head_zeroinit=False, **OURS, **settings)
      plain = models.create(model_name, head_zeroinit=False, **OURS)
      params = _with_predictors(
          convert.from_timm(model_name, state_dict_of(references[case]), model=plain),
          references[case], settings.get("token_pruning_layers", ()))
      traces = []
      built[case] = (_jit_intermediates(model, traces), params, traces)
    return built[case]
  return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_pytorch_recreation_on_timm(case, references, ours, images):
  model_name, _ = CASES[case]
  ref = references[case]
  run, params, _ = ours(case)
  logits, inter = run(params, images)
  assert np.abs(ref["logits"]).mean() > 0.3  # logits of order 1, not ~0
  print(case, f"max |logit diff| {np.abs(logits - ref['logits']).max():.1e}",
        f"mean |logit| {np.abs(ref['logits']).mean():.2f}")
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(inter["features"], ref["features"], atol=1e-4, rtol=0)
  for i in range(3):
    ours, theirs = np.asarray(inter[f"Transformer/block_{i}"]), ref[f"tokens/{i}"]
    assert ours.shape == theirs.shape, (i, ours.shape, theirs.shape)
    if "evit" in case or "dynamic" in case:  # published: by score; ours: by position
      ours, theirs = np.sort(ours, axis=1), np.sort(theirs, axis=1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * max(1, np.abs(theirs).max()))
  if case == "vit_r0":  # exactly the plain model: same code path, same numbers
    plain = models.create(model_name, head_zeroinit=False, **OURS)
    np.testing.assert_array_equal(_jit_intermediates(plain, [])(params, images)[0], logits)


def test_token_counts_sizes_and_sources_are_static_and_consistent(ours, images):
  run, params, traces = ours("deit_distilled_r16")
  run(params, images)
  _, inter = run(params, images[::-1])
  assert len(traces) == 1  # a new batch, no retrace
  counts = [inter[f"Transformer/block_{i}"].shape[1] for i in range(3)]
  assert counts == [51 - 16, 51 - 32, 51 - 32 - 8]  # last block clamped to (19 - 2) // 2
  size, source = inter["Transformer/token_size_2"], inter["Transformer/token_source_2"]
  assert source.shape == (2, 11, 51)
  np.testing.assert_array_equal(source.sum(axis=1), 1)  # every input token in one token
  np.testing.assert_array_equal(source.sum(axis=2), size)
  np.testing.assert_array_equal(source[:, :2, :2], np.eye(2)[None].repeat(2, 0))  # prefix

  assignment = visualize.token_assignment(source, 2, (7, 7))
  assert assignment.shape == (2, 7, 7) and assignment.min() >= 2
  picture = visualize.merged_regions_image(images[0], assignment[0], size=112)
  assert picture.size == (112, 112) and picture.mode == "RGB"
  png = io.BytesIO()
  picture.save(png, format="PNG")
  assert png.getvalue()[:4] == b"\x89PNG"
  # The patches of one token share one colour away from the outlines.
  pixels = np.asarray(picture)
  token = np.bincount(assignment[0].ravel()).argmax()
  rows, cols = np.nonzero(assignment[0] == token)
  colours = {tuple(pixels[r * 16 + 8, c * 16 + 8]) for r, c in zip(rows, cols)}
  assert len(colours) == 1 and len(rows) > 1


def test_merging_clamps_each_block_as_tome_and_says_so_once(ours, images, caplog):
  """More merges than patches run as ToMe runs them: each block merges at most half of
  its unprotected tokens (the parity case above checks the numbers); the model states
  the effective schedule and warns once with requested and effective r."""
  model = models.create("vit_tiny_patch16_224", token_merging=(24, 0, 30), **OURS)
  assert model.effective_token_merging() == (24, 0, 12)
  run, params, _ = ours("vit_schedule_clamped")
  _, inter = run(params, images)
  assert [inter[f"Transformer/block_{i}"].shape[1] for i in range(3)] == [26, 26, 14]
  # A 24-block ViT-L/16 at r=16 (the setting that prompted this) keeps the class token
  # and one patch token; a schedule within reach is unchanged.
  large = models.create("vit_large_patch16_224", token_merging=16)
  assert large.effective_token_merging() == (16,) * 11 + (10, 5, 2, 1, 1) + (0,) * 8
  assert models.create("vit_tiny_patch16_224", token_merging=(8, 0, 12),
                       **OURS).effective_token_merging() == (8, 0, 12)
  assert model.effective_token_merging(112) == (24, 0, 30)  # 196 patches: in reach
  notes = token_reduction_bench.clamped_settings("vit_large_patch16_224", {
      "plain": {}, "ToMe r=4": {"token_merging": 4}, "ToMe r=16": {"token_merging": 16}})
  assert list(notes) == ["ToMe r=16"]
  assert notes["ToMe r=16"].endswith("197 tokens in, 2 after the last block")
  token_reduction._CLAMP_WARNED.clear()  # pylint: disable=protected-access
  with caplog.at_level("WARNING"):
    for _ in range(2):
      jax.eval_shape(model.init, jax.random.key(0), images)
  warnings = [r.getMessage() for r in caplog.records if "ToMe's clamp" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "requested r per block (24, 0, 30), effective (24, 0, 12)" in warnings[0]
  assert "50 tokens in, 14 after the last block" in warnings[0]


def test_pallas_falls_back_to_xla_and_clip_towers_merge(images):
  """Proportional attention needs a bias the flash kernel lacks: same numbers as XLA."""
  xla = models.create("vit_tiny_patch16_224", token_merging=4, **OURS)
  pallas = models.create("vit_tiny_patch16_224", token_merging=4,
                         attention_impl="pallas", **OURS)
  variables = jax.eval_shape(xla.init, jax.random.key(0), images)
  program = lambda model: str(jax.make_jaxpr(model.apply)(variables, images))
  assert program(pallas) == program(xla)  # the very same computation, no kernel call
  assert "pallas_call" in program(models.create("vit_tiny_patch16_224",
                                                attention_impl="pallas", **OURS))
  # A CLIP image tower (pre-norm, no patch bias; with remat) and the two-tower image side.
  tower = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, image_size=56,
               patch_size=8, token_merging=12, remat_policy="full")
  clip = models.create("vit_base_patch32_clip_224", num_classes=0, **tower)
  shape = jax.eval_shape(lambda x: models.forward_intermediates(
      clip, clip.init(jax.random.key(0), x), x)[1], images)
  assert shape["Transformer/block_1"].shape == (2, 50 - 24, 32)
  two = models.create("clip_vit_base_patch32_224", image=tower, text=dict(
      hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, context_length=8,
      vocab_size=64), embed_dim=16)
  text = jnp.ones((2, 8), jnp.int32)
  inter = jax.eval_shape(lambda x, t: models.forward_intermediates(
      two, two.init(jax.random.key(0), x, t), x)[1], images, text)
  assert inter["img/Transformer/block_1"].shape == (2, 50 - 24, 32)


def test_dynamic_pruning_trains_its_predictor_with_static_shapes(images):
  """DynamicViT in training: every token stays, marked kept (1) or dropped (0) by hard
  Gumbel samples that only ever drop more; the task loss reaches the predictors."""
  model = models.create("vit_tiny_patch16_224", head_zeroinit=False, hidden_size=32,
                        num_heads=2, mlp_dim=64, token_pruning=0.7,
                        token_pruning_layers=(1, 2), **OURS)
  variables = model.init(jax.random.key(0), images)
  traces = []

  @jax.jit
  def train_forward(params, x, rng):
    traces.append(x.shape)

    def loss(params):
      logits, state = model.apply({"params": params}, x, train=True, rngs={"dropout": rng},
                                  mutable=["intermediates"])
      return (logits ** 2).mean(), state["intermediates"]["Transformer"]
    return jax.grad(loss, has_aux=True)(params)

  grads, inter = train_forward(variables["params"], images, jax.random.key(1))
  train_forward(variables["params"], images[::-1], jax.random.key(2))
  assert len(traces) == 1  # a new batch and new samples, no retrace
  first, second = (np.asarray(inter[f"encoderblock_{i}"]["keep_decision"][0]) for i in (1, 2))
  assert first.shape == second.shape == (2, 49)
  assert set(np.unique(first)) <= {0.0, 1.0} and 0 < first.sum() < first.size
  assert (second <= first).all() and second.sum() < first.sum()
  assert inter["block_2"][0].shape == (2, 50, 32)  # nothing dropped in training
  np.testing.assert_array_equal(inter["token_size_2"][0][:, 1:], second)
  for i in (1, 2):
    predictor = grads["Transformer"][f"encoderblock_{i}"]["score_predictor"]
    assert np.abs(predictor["Dense_3"]["kernel"]).max() > 0, i
  # Inference drops them: 49 patches, then 34 and 24.
  inter = jax.eval_shape(lambda v, x: models.forward_intermediates(model, v, x)[1],
                         variables, images)
  assert [inter[f"Transformer/block_{i}"].shape[1] for i in range(3)] == [50, 35, 25]

  # The training attention: a dropped key does not reach the other queries.
  q, k, v = jax.random.normal(jax.random.key(3), (3, 1, 6, 2, 4))
  policy = jnp.array([[1.0, 1, 0, 1, 0, 1]])
  out = token_reduction.policy_attention(q, k, v, policy)
  moved = token_reduction.policy_attention(q, k, v.at[:, 2].add(100.0), policy)
  others = np.array([0, 1, 3, 4, 5])
  np.testing.assert_allclose(out[:, others], moved[:, others], atol=1e-3)
  assert np.abs(moved[:, 2] - out[:, 2]).min() > 10  # its own query still sees it


@pytest.mark.parametrize("settings, message", [
    (dict(token_merging=(4, 4)), "one r per block"),
    (dict(token_merging=-1), "token_merging must be >= 0"),
    (dict(token_keep_rate=0.0), r"token_keep_rate must be in \(0, 1\], got 0.0"),
    (dict(token_keep_rate=1.5), r"token_keep_rate must be in \(0, 1\]"),
    (dict(token_keep_rate=0.5, token_keep_layers=(3,)), r"in \[0, 3\)"),
    (dict(token_merging=4, token_keep_rate=0.5), "set one of them"),
    (dict(token_merging=4, scan_layers=True), "scan_layers=False"),
    (dict(token_keep_rate=0.5, classifier="gap"), "needs classifier='token'"),
    (dict(token_merging=4, attention="linear"), "attention='softmax'"),
    (dict(token_pruning=0.0), r"token_pruning must be in \(0, 1\], got 0.0"),
    (dict(token_pruning=0.7, token_keep_rate=0.7), "set one of them"),
    (dict(token_pruning=0.1), r"keeps int\(0.1\*\*3 \* 49\) = 0 of the 49 patch"),
    (dict(token_pruning=0.7, classifier="gap"), "token_pruning .*needs classifier='token'"),
    (dict(token_pruning=0.7, token_pruning_layers=(3,)),
     r"token_pruning_layers must be distinct block indices in \[0, 3\)"),
])
def test_bad_settings_are_one_line_errors(settings, message, images):
  model = models.create("vit_tiny_patch16_224", **{**OURS, **settings})
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), images)


def test_families_that_cannot_merge_say_so():
  for name in ("swin_tiny_patch4_window7_224", "pvt_v2_b0"):
    with pytest.raises(ValueError, match=r"has no setting 'token_merging': token "
                                         r"reduction .* plain-ViT families"):
      models.create(name, token_merging=8)
  with pytest.raises(ValueError, match="token_keep_rate"):
    models.create("maxvit_tiny_tf_224", token_keep_rate=0.7)


def test_token_merging_notebook_draws_the_merges(monkeypatch, tmp_path):
  """colabs/token_merging.ipynb top to bottom as tests/test_colabs.py runs notebooks
  (an empty directory, the installed package, no PYTHONPATH), random weights: one
  strip of merged regions per setting, the token counts ToMe and EViT promise."""
  import nbformat  # pylint: disable=g-import-not-at-top
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(os.path.join(REPO, "colabs", "token_merging.ipynb"), as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell('WEIGHTS = ""'))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("PYTHONPATH", raising=False)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert os.listdir(tmp_path) == []
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
  imported = text.split("vit_jax ", 1)[1].split(" from ", 1)[1].split("\n", 1)[0]
  assert os.path.realpath(imported) == os.path.realpath(os.path.join(REPO, "vit_jax"))
  assert "random weights" in text, text
  # 65 tokens; ToMe r=8 merges 8 per block; EViT keeps ceil(0.5 * n) of the n patch
  # tokens (the fused one among them) in blocks 1-3, plus a new fused and the class token.
  assert "ToMe r=8: tokens after each block [57, 49, 41, 33]" in text, text
  assert "EViT keep=0.5: tokens after each block [65, 34, 19, 11]" in text, text
  pictures = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
  assert len(pictures) == 2
