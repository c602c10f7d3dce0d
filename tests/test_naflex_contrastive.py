"""NaFlex in the contrastive trainer (issue 21): ``configs/clip_digits.py:naflex``.

The image-text pipeline's ``naflex`` op output is checked against a numpy
patchification of the same resized image, then a tiny CLIP with a NaFlex image tower
trains one step in this process and runs its zero-shot evaluation.
"""

import io
import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from vit_jax.data import image_text, packing, preprocess
from vit_jax.tools import make_pool

# Scenes of other aspect ratios than the pool's squares: (height, width).
SHAPES = [(32, 32), (20, 50), (48, 16), (7, 30)]
BUDGET, PATCH = 16, 4


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("naflex_pool"))
  make_pool.make_pool(directory, num_samples=64, samples_per_shard=32, eval_renders=1)
  # A smaller held-out set (10 of the 360) keeps the evaluation quick.
  raws = [raw for shard in image_text.expand_shards(os.path.join(directory, "eval"))
          for raw in image_text.read_shard(shard)]
  with image_text.ShardWriter(os.path.join(directory, "eval_small", "e-{:03d}.tar"),
                              1000) as writer:
    for raw in raws[::36]:
      writer.write(raw.key, raw.files)
  return directory


def _numpy_grid(h: int, w: int, budget: int) -> tuple[int, int]:
  """NaFlex's grid, re-derived: the largest near-aspect grid of <= budget patches."""
  scale = math.sqrt(budget / (h * w))
  rows = min(max(math.floor(h * scale), 1), budget)
  cols = min(max(math.floor(w * scale), 1), budget // rows)
  return rows, cols


def test_pipeline_patchifies_like_numpy(tmp_path):
  """Eval batches through ``naflex(4, 16)`` hold, per image, numpy's patchify of the
  image resized to the grid numpy derives, padded with segment id 0."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shard = str(tmp_path / "s-{:03d}.tar")
  pngs = []
  with image_text.ShardWriter(shard, 100) as writer:
    for i, (h, w) in enumerate(SHAPES):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buffer, "png")
      pngs.append(buffer.getvalue())
      writer.write(f"img{i}", {"png": pngs[-1], "txt": b"a caption"})
  shards = image_text.expand_shards(str(tmp_path / "s-*.tar"))
  batch = next(image_text.make_eval_batches(
      shards, batch_size=len(SHAPES), threads=1,
      preprocess_fn=preprocess.parse(f"decode|value_range(-1, 1)|naflex({PATCH}, {BUDGET})")))
  inputs = image_text.model_images(batch)
  assert inputs["patches"].shape == (len(SHAPES), BUDGET, PATCH * PATCH * 3)
  for i, (h, w) in enumerate(SHAPES):
    rows, cols = _numpy_grid(h, w, BUDGET)
    assert inputs["grid_sizes"][i].tolist() == [[rows, cols]], (h, w)
    resized = preprocess.parse(f"decode|value_range(-1, 1)|resize(({rows * PATCH}, "
                               f"{cols * PATCH}))")({"image": tf.constant(pngs[i])})["image"]
    want = packing.patchify(np.asarray(resized), PATCH)
    n = rows * cols
    np.testing.assert_allclose(inputs["patches"][i, :n], want["patches"], atol=1e-6)
    assert (inputs["patches"][i, n:] == 0).all()
    np.testing.assert_array_equal(inputs["positions"][i, :n], want["positions"])
    assert inputs["segment_ids"][i].tolist() == [1] * n + [0] * (BUDGET - n)


def test_model_images_names_what_is_missing():
  with pytest.raises(image_text.DataError, match=r"no NaFlex inputs \['positions'"):
    image_text.model_images({"patches": 0, "segment_ids": 0, "grid_sizes": 0})


def test_clip_digits_naflex_trains_and_evaluates(pool, tmp_path):
  """A step of ``clip_digits.py:naflex`` in-process: NaFlex patches reach the
  image tower in training and in the zero-shot evaluation."""
  from vit_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
  from vit_jax.workdir import MODEL_FILE  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import clip_digits  # pylint: disable=g-import-not-at-top
  config = clip_digits.get_config("naflex")
  config.input.pool = pool
  config.input.update(batch_size=16, eval_batch_size=10, shards_per_window=2, threads=1)
  config.model.image.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  config.model.text.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  config.model.embed_dim = 32
  config.evals.retrieval = {}  # the same image path as zero-shot: one compile less
  config.evals.zero_shot.digits.shards = os.path.join(pool, "eval_small")
  config.update(total_steps=1, log_every=1, eval_every=0, checkpoint_every=1)
  config.schedule.warmup_steps = 0
  result = contrastive.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 1 and len(result["train_loss_history"]) == 1
  assert all(np.isfinite(loss) for _, loss in result["train_loss_history"])
  assert result["eval/zero_shot/digits/count"] == 10
  assert 0.0 <= result["eval/zero_shot/digits/top1"] <= 1.0
  # The workdir describes the NaFlex model and its pp (what load_trained rebuilds).
  with open(tmp_path / "run" / MODEL_FILE) as f:
    described = json.load(f)
  assert described["model"]["naflex"] and described["model"]["image"]["classifier"] == "map"
  assert described["pp_eval"].endswith(f"naflex({PATCH}, {BUDGET})")


def test_config_variant_errors():
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import clip_digits  # pylint: disable=g-import-not-at-top
  assert clip_digits.get_config("siglip,naflex").model.naflex
  with pytest.raises(ValueError, match="'clip' or 'siglip' and/or 'naflex'"):
    clip_digits.get_config("clip,siglip")
  with pytest.raises(ValueError, match="got 'naflx'"):
    clip_digits.get_config("naflx")

