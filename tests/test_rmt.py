"""RMT: exact official parameter counts, parity with a PyTorch re-creation of the official
forward, official-checkpoint conversion, sizes and errors, dtypes, drop path, training.

RMT is not in timm. ``tests/rmt_official_ref.py`` re-creates qhfan/RMT's
``classfication_release/RMT.py`` (same module and state-dict names, same float32
arithmetic; while developing it gave bit-identical logits, features and stage maps to the
official file on two reduced configurations); it runs in one subprocess for the
whole module (``official_ref.py``) with random weights and BatchNorm statistics.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cheap_compiles import cheap_compiles  # noqa: F401  (autouse: cheaper XLA compiles)
from helpers import (assert_matches_reference, intermediate_shapes, run_timm_reference,
                     state_dict_of, train_in_process)
from vit_jax import models
from vit_jax.models import convert, official, rmt

# sum(p.numel()) of the official VisRetNet with each registered configuration
# (RMT_T3, RMT_S, RMT_M2, RMT_L6: 1000 classes, projection 1024), counted with the
# official file and checked again below on the re-creation. The README rounds them to
# 14M, 27M, 54M and 95M.
OFFICIAL_PARAM_COUNTS = {
    "rmt_tiny": 14_334_216,
    "rmt_small": 26_967_240,
    "rmt_base": 54_154_896,
    "rmt_large": 95_464_864,
}

# RMT-B's widths, heads, decay settings and layer scales (decomposed attention in stages
# 0-2, full 2D attention in stage 3, layer scale in stages 2-3), one block per stage, on
# odd, non-square inputs: maps 19x25, 10x13, 5x7, 3x4.
PARITY = dict(depths=(1, 1, 1, 1), num_classes=10)
PARITY_IMAGES = (2, 75, 97, 3)
# Our settings -> the official constructor's argument names.
OFFICIAL_ARGS = {"embed_dims": "embed_dims", "depths": "depths", "num_heads": "num_heads",
                 "initial_values": "init_values", "heads_ranges": "heads_ranges",
                 "mlp_ratios": "mlp_ratios", "decomposed": "chunkwise_recurrents",
                 "layer_scales": "layerscales"}

TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 4),
            projection=48, num_classes=10)


def official_config(name: str, **overrides) -> dict:
  """The official constructor's arguments for a registered variant with overrides."""
  model = models.create(name, **overrides)
  config = {theirs: list(getattr(model, ours)) for ours, theirs in OFFICIAL_ARGS.items()}
  return {**config, "num_classes": model.num_classes}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One torch subprocess: the re-creation's counts, and the parity model's outputs."""
  images = np.random.RandomState(0).randn(*PARITY_IMAGES)
  jobs = [{"family": "rmt", "counts": True},
          {"family": "rmt", "config": official_config("rmt_base", **PARITY),
           "images": images, "randomize": 0.05}]
  counts, out = run_timm_reference(jobs, tmp_path_factory.mktemp("rmt_ref"),
                                   script="official_ref.py")
  return counts, out, images


def test_every_registered_variant_has_an_exact_count(reference):
  assert sorted(models.list_models(family="rmt")) == sorted(OFFICIAL_PARAM_COUNTS)
  counts, _, _ = reference
  # The re-creation, built with the official configurations, has the same counts.
  assert {k.split("/")[1]: int(v) for k, v in counts.items()} == OFFICIAL_PARAM_COUNTS


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_param_count(name):
  assert models.param_count(name) == OFFICIAL_PARAM_COUNTS[name]


def test_matches_the_official_forward(reference):
  """Logits, pooled features and every stage map within 1e-4 of the official forward."""
  _, out, images = reference
  variables = rmt.variables_from_official("rmt_base", state_dict_of(out), **PARITY)
  model = models.create("rmt_base", **PARITY)
  logits, inter = jax.jit(lambda v, x: models.forward_intermediates(model, v, x))(
      variables, np.asarray(images, np.float32))
  assert_matches_reference(out, logits, inter, label="rmt_base")


def test_official_conversion_errors(reference):
  state, overrides = state_dict_of(reference[1]), PARITY
  assert state["layers.0.Relpos.decay"].shape == (5,)
  assert "layers.0.downsample.norm.running_var" in state
  with pytest.raises(convert.ConversionError, match=r"RMT checkpoints also hold BatchNorm "
                                                    r"statistics .*variables_from_official"):
    official.from_official("rmt_base", state, **overrides)
  # A checkpoint of other decay settings is named, not silently loaded.
  with pytest.raises(convert.ConversionError,
                     match=r"layers.2.Relpos.decay does not match the model's decay rates "
                           r"\(stage 2: initial_values=2, heads_ranges=3\)"):
    rmt.variables_from_official("rmt_base", state, heads_ranges=(5, 5, 3, 6), **overrides)
  broken = dict(state)
  del broken["layers.1.blocks.0.ffn.dwconv.conv.bias"]
  with pytest.raises(convert.ConversionError,
                     match="no entry 'layers.1.blocks.0.ffn.dwconv.conv.bias'"):
    rmt.variables_from_official("rmt_base", broken, **overrides)
  with pytest.raises(convert.ConversionError, match="unexpected: extra"):
    rmt.variables_from_official("rmt_base", dict(state, extra=np.zeros(1)), **overrides)
  with pytest.raises(convert.ConversionError, match="'pvt_tiny' is a 'pvt' model"):
    rmt.variables_from_official("pvt_tiny", state)


# ------------------------------------------------------------ the spatial prior


def test_decay_bias_is_the_manhattan_distance_times_log_gamma():
  decay = rmt.decay_rates(4, 2, 4)
  # gamma_h = 1 - 2^-(2 + 4h/4) = 3/4, 7/8, 15/16, 31/32.
  np.testing.assert_allclose(np.exp(decay), [3 / 4, 7 / 8, 15 / 16, 31 / 32])
  bias = np.asarray(rmt.manhattan_decay_bias(decay, 3, 5))  # tokens in raster order
  assert bias.shape == (4, 15, 15)
  # Token (0, 1) and token (2, 4): |dy| + |dx| = 2 + 3.
  np.testing.assert_allclose(bias[:, 1, 2 * 5 + 4], 5 * decay, rtol=1e-6)
  np.testing.assert_allclose(np.diagonal(bias, axis1=1, axis2=2), 0)
  # The decomposed form's two factors: the same distances along one axis at a time.
  rows = np.asarray(rmt.axis_decay_bias(decay, 5))
  np.testing.assert_allclose(rows[:, 1, 4], 3 * decay, rtol=1e-6)


def test_decomposed_attention_is_rows_then_columns():
  """The decomposed form against a direct loop over rows, then columns (float64)."""
  rng = np.random.RandomState(1)
  q, k, v = (rng.randn(1, 3, 4, 2, 6) for _ in range(3))
  decay = rmt.decay_rates(2, 2, 4)
  out = rmt.manhattan_attention(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), decay,
                                decomposed=True)

  def attend(q, k, v, distance):  # q, k, v: [tokens, heads, d]
    logits = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    logits = logits + distance[None] * decay[:, None, None]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", weights / weights.sum(-1, keepdims=True), v)

  dist = lambda n: np.abs(np.arange(n)[:, None] - np.arange(n)[None])
  rows = np.stack([attend(q[0, y], k[0, y], v[0, y], dist(4)) for y in range(3)])
  expected = np.stack([attend(q[0, :, x], k[0, :, x], rows[:, x], dist(3))
                       for x in range(4)], axis=1)
  np.testing.assert_allclose(out[0], expected, atol=1e-5)


# ------------------------------------------------------------ model surface


def test_sizes_and_errors():
  model = models.create("rmt_tiny", **TINY)
  logits, inter = intermediate_shapes(model, (2, 33, 50, 3))
  assert logits == (2, 10) and inter["features"] == (2, 48)
  assert [inter[f"stage_{i}"] for i in range(4)] == [
      (2, 9, 13, 8), (2, 5, 7, 16), (2, 3, 4, 24), (2, 2, 2, 32)]
  assert intermediate_shapes(models.create("rmt_tiny", **{**TINY, "num_classes": 0}),
                 (1, 8, 8, 3))[0] == (1, 48)
  with pytest.raises(ValueError, match=r"RMT stage 3: embed_dims\[3\]=32 must split into "
                                       r"num_heads\[3\]=3 heads of an even width"):
    intermediate_shapes(models.create("rmt_tiny", **{**TINY, "num_heads": (2, 2, 2, 3)}),
            (1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"RMT.decomposed=\(True, False\) has 2 entries; "
                                       "the model has 4 stages"):
    intermediate_shapes(models.create("rmt_tiny", **{**TINY, "decomposed": (True, False)}),
            (1, 32, 32, 3))
  with pytest.raises(ValueError, match="expected NHWC images"):
    intermediate_shapes(model, (32, 32, 3))
  with pytest.raises(ValueError, match="has no setting 'window_size'"):
    models.create("rmt_tiny", window_size=7)


def test_parameter_layout():
  variables = jax.eval_shape(lambda: models.create("rmt_base", depths=(1, 1, 1, 1)).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  flat = {"/".join(str(k.key) for k in path): x.shape for path, x in
          jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  assert flat["patch_embed/conv_0/kernel"] == (3, 3, 3, 40)
  assert flat["patch_embed/conv_3/kernel"] == (3, 3, 80, 80)
  assert flat["stages_1/downsample/conv/kernel"] == (3, 3, 80, 160)
  assert flat["stages_0/blocks_0/cpe/kernel"] == (3, 3, 1, 80)
  assert flat["stages_0/blocks_0/retention/lepe/kernel"] == (5, 5, 1, 80)
  assert flat["stages_0/blocks_0/ffn/dwconv/kernel"] == (3, 3, 1, 320)
  assert flat["stages_2/blocks_0/gamma_1"] == (320,)
  assert "stages_1/blocks_0/gamma_1" not in flat  # layer scale only in stages 2 and 3
  assert flat["proj/kernel"] == (512, 1024) and flat["head/kernel"] == (1024, 1000)
  stats = {"/".join(str(k.key) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]}
  assert len(stats) == 2 * (4 + 3 + 1)  # stem, downsamplings, head: mean and var


def test_trains(tfds_dir, tmp_path):
  """A one-stage tiny RMT (stem, a decomposed-attention block, BatchNorm head) trains
  through the classification trainer: the loss falls."""
  result = train_in_process(
      tfds_dir, tmp_path / "rmt", "rmt_tiny", steps=40, learning_rate=3e-3, input_size=16,
      embed_dims=(16,), depths=(1,), num_heads=(2,), mlp_ratios=(3,), initial_values=(2,),
      heads_ranges=(4,), decomposed=(True,), layer_scales=(False,), projection=64,
      num_classes=10)
  losses = [loss for _, loss in result["train_loss_history"]]
  assert losses[-1] < losses[0], losses
  # Held-out loss well below ln(10) = 2.303, the loss of the near-uniform initial logits.
  assert result["eval_loss"] < math.log(10) - 0.1, result
