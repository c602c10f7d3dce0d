"""FlexiViT (PI-resize, any patch size) and NaFlex/NaViT packing (issue 21)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.data import packing, preprocess
from vit_jax.models import naflex, resample

TINY = dict(num_classes=0, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
            head_zeroinit=False)


def _tf_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]``: tf.image.resize(method="bilinear") on one axis, re-created.

  TF 2's half-pixel centres: output ``i`` samples ``(i + 0.5) * n_in / n_out - 0.5``,
  lower index ``max(floor(s), 0)``, upper ``min(ceil(s), n_in - 1)``, weight
  ``s - floor(s)``.
  """
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    s = (i + 0.5) * n_in / n_out - 0.5
    lo, hi = max(int(np.floor(s)), 0), min(int(np.ceil(s)), n_in - 1)
    frac = s - np.floor(s)
    out[i, lo] += 1 - frac
    out[i, hi] += frac
  return out


def _tf_resize(x: np.ndarray, new_hw) -> np.ndarray:
  return _tf_bilinear_matrix(x.shape[0], new_hw[0]) @ x @ _tf_bilinear_matrix(
      x.shape[1], new_hw[1]).T


def _published_pi_resize(old: np.ndarray, new_hw) -> np.ndarray:
  """big_vision's ``resample_patchemb`` (FlexiViT), re-created in numpy: the resize
  matrix is built by resizing each basis patch, then ``pinv(B^T) @ kernel``."""
  old_hw = old.shape[:2]
  columns = []
  for i in range(int(np.prod(old_hw))):
    basis = np.zeros(old_hw)
    basis[np.unravel_index(i, old_hw)] = 1.0
    columns.append(_tf_resize(basis, new_hw).reshape(-1))
  resize_mat = np.stack(columns).T
  pinv = np.linalg.pinv(resize_mat.T)
  out = np.zeros(tuple(new_hw) + old.shape[2:])
  for c in range(old.shape[2]):
    for d in range(old.shape[3]):
      out[:, :, c, d] = (pinv @ old[:, :, c, d].reshape(-1)).reshape(new_hw)
  return out


@pytest.mark.parametrize("old_hw,new_hw", [((8, 8), (16, 16)), ((16, 16), (8, 8)),
                                           ((4, 4), (6, 10)), ((5, 3), (7, 7))])
def test_pi_resize_is_the_published_formula(old_hw, new_hw):
  kernel = np.random.default_rng(0).normal(size=old_hw + (3, 4)).astype(np.float32)
  got = resample.resize_patch_kernel(jnp.asarray(kernel), new_hw)
  np.testing.assert_allclose(np.asarray(got), _published_pi_resize(kernel, new_hw),
                             atol=1e-5, rtol=1e-5)


def test_pi_resize_errors():
  kernel = jnp.zeros((8, 8, 3, 4))
  with pytest.raises(ValueError, match="positive integer"):
    resample.resize_patch_kernel(kernel, (0, 8))
  with pytest.raises(ValueError, match="method"):
    resample.resize_patch_kernel(kernel, (4, 4), method="nearest")


@pytest.fixture(scope="module")
def vit8():
  """A ViT at patch 8 on 32 px images, its variables, and a batch."""
  model = models.create("vit_tiny_patch16_224", image_size=32, patch_size=8,
                        classifier="token", **TINY)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  return model, variables, images


def test_flexi_upsampled_images_give_the_same_features(vit8):
  """PI-resize's promise: patch 8 on an image == patch 16 on it with every patch
  upsampled 2x (bilinear, patch by patch)."""
  model, variables, images = vit8
  patches = np.asarray(images).reshape(2, 4, 8, 4, 8, 3)
  up = np.einsum("ih,jw,bxhywc->bxiyjc", _tf_bilinear_matrix(8, 16),
                 _tf_bilinear_matrix(8, 16), patches).reshape(2, 64, 64, 3)
  up = up.astype(np.float32)
  want = jax.jit(model.apply)(variables, images)
  got = jax.jit(model.clone(flexi_patch_size=16).apply)(variables, jnp.asarray(up))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  naive = jax.jit(model.clone(flexi_patch_size=16, flexi_resize="bilinear").apply)(
      variables, jnp.asarray(up))
  assert np.abs(naive - want).max() > 1e-2  # the baseline the paper improves on
  # Same stored parameters at every patch size, so any checkpoint loads unchanged.
  flexi = model.clone(flexi_patch_size=4)
  shapes = jax.tree.map(jnp.shape, jax.eval_shape(flexi.init, jax.random.key(0), images))
  assert shapes == jax.tree.map(jnp.shape, variables)
  out = jax.eval_shape(flexi.apply, variables, images)  # 64 tokens, table resampled
  assert out.shape == (2, 32)


def test_flexi_gradients_reach_the_stored_kernel(vit8):
  model, variables, images = vit8
  flexi = model.clone(flexi_patch_size=16)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(flexi.apply({"params": p}, images) ** 2)))(
      variables["params"])
  assert grads["embedding"]["kernel"].shape == (8, 8, 3, 32)
  assert float(jnp.abs(grads["embedding"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["Transformer"]["posembed_input"]["pos_embedding"]).max()) > 0


def test_flexi_errors(vit8):
  model, variables, images = vit8
  with pytest.raises(ValueError, match="flexi_patch_size must be a positive integer"):
    model.clone(flexi_patch_size=0).apply(variables, images)
  with pytest.raises(ValueError, match="patch size 12 needs image sides divisible"):
    model.clone(flexi_patch_size=12).apply(variables, images)
  with pytest.raises(ValueError, match="flexi_resize"):
    model.clone(flexi_patch_size=8, flexi_resize="area").apply(variables, images)


# ----------------------------------------------------------------------------
# NaFlex / NaViT packing
# ----------------------------------------------------------------------------

# Three images of different sizes and aspect ratios (2:1, 1:3, 1:1) at patch 4.
SIDES = [(8, 16), (12, 4), (8, 8)]


@pytest.fixture(scope="module")
def packed_case():
  """A NaFlex ViT (kernel stored at 8, run at 4) and one pack of three images."""
  base = models.create("vit_tiny_patch16_224", image_size=16, patch_size=8,
                       classifier="map", **TINY)
  model = naflex.naflex(base, flexi_patch_size=4)
  rng = np.random.default_rng(0)
  examples = [packing.patchify(rng.normal(size=s + (3,)).astype(np.float32), 4)
              for s in SIDES]
  pack = {k: v[None] for k, v in packing.pack(examples, 24, 4).items()}
  # The same images alone: one image per sequence, padded to another length.
  alone = {k: np.concatenate([packing.unpacked(e, 12)[k] for e in examples])
           for k in naflex.INPUT_KEYS}
  variables = jax.jit(model.init)(jax.random.key(0), pack)
  return model, variables, pack, alone


def test_packed_images_equal_the_images_alone(packed_case):
  """Block-diagonal attention and per-image pooling: forward and gradients, through
  the XLA reference; the flash kernel (interpret mode) on the pack equals the
  reference on it, hence the images alone too."""
  model, variables, pack, alone = packed_case
  probe = jax.random.normal(jax.random.key(2), (len(SIDES), 32))

  def loss(params, inputs, packed, impl):
    features = model.clone(attention_impl=impl).apply({"params": params}, inputs)
    features = features[0, :len(SIDES)] if packed else features[:, 0]  # [images, D]
    return jnp.sum(jnp.tanh(features) * probe), features

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(2, 3))
  results = {"alone": grad_fn(variables["params"], alone, False, "xla"),
             "packed": grad_fn(variables["params"], pack, True, "xla"),
             "packed, flash kernel": grad_fn(variables["params"], pack, True, "pallas")}
  (_, want), want_grads = results["alone"]
  assert float(jnp.abs(want_grads["embedding"]["kernel"]).max()) > 0
  for name in ("packed", "packed, flash kernel"):
    (_, got), grads = results[name]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)
    expected = dict(jax.tree_util.tree_leaves_with_path(want_grads))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      np.testing.assert_allclose(g, expected[path], atol=1e-5, rtol=1e-4,
                                 err_msg=f"{name}: {path}")


def test_naflex_is_the_flexivit_model_on_one_full_image():
  """An unpacked image through NaFlex (per-image table, flat patches) gives the plain
  ViT's output on it (FlexiViT path: conv, table resampled by resample_posemb)."""
  base = models.create("vit_tiny_patch16_224", image_size=16, patch_size=8,
                       classifier="gap", **TINY).clone(flexi_patch_size=4)
  image = np.random.default_rng(1).normal(size=(12, 24, 3)).astype(np.float32)
  variables = jax.jit(base.init)(jax.random.key(0), image[None])
  want = jax.jit(base.apply)(variables, image[None])
  got = jax.jit(naflex.naflex(base).apply)(
      variables, packing.unpacked(packing.patchify(image, 4), 20))
  np.testing.assert_allclose(got[:, 0], want, atol=1e-5, rtol=1e-5)


def test_naflex_preprocessing_op():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  op = preprocess.parse("naflex(4, 16)")
  out = op({"image": tf.zeros((20, 50, 3), tf.uint8), "label": 1})
  assert out["patches"].shape == (16, 48) and out["label"] == 1
  rows, cols = out["grid_sizes"].numpy()[0]
  assert rows * cols <= 16 and cols / rows == pytest.approx(50 / 20, rel=0.3)
  assert int(tf.reduce_sum(out["segment_ids"])) == rows * cols
  assert out["positions"].numpy()[rows * cols - 1].tolist() == [rows - 1, cols - 1]
  # A thin image still gets a whole patch; the grid never exceeds the budget.
  thin = op({"image": tf.zeros((1, 500, 3), tf.uint8)})["grid_sizes"].numpy()[0]
  assert thin.tolist() == [1, 16]


def test_pack_stream_has_fixed_shapes():
  rng = np.random.default_rng(0)
  stream = [dict(packing.patchify(np.zeros((4 * h, 4 * w, 3), np.float32), 4), label=i)
            for i, (h, w) in enumerate(rng.integers(1, 4, size=(9, 2)))]
  batches = list(packing.pack_stream(stream, seq_len=12, images_per_pack=3,
                                     batch_size=2, extra_keys=("label",)))
  assert batches and all(b["patches"].shape == (2, 12, 48) for b in batches)
  assert all(b["label"].shape == (2, 3) for b in batches)
  labels = [l for b in batches for l in b["label"].reshape(-1) if l >= 0]
  assert labels == list(range(len(labels)))  # stream order kept, no image dropped


def test_packing_errors(packed_case):
  model, variables, pack, _ = packed_case
  image = packing.patchify(np.zeros((8, 8, 3), np.float32), 4)
  with pytest.raises(ValueError, match="more than the pack's seq_len=3"):
    packing.pack([image], 3, 2)
  with pytest.raises(ValueError, match="zero 4x4 patches"):
    packing.patchify(np.zeros((2, 8, 3)), 4)
  with pytest.raises(ValueError, match="image 0 of the pack has zero patches"):
    packing.pack([dict(image, segment_ids=np.zeros(4))], 8, 2)
  with pytest.raises(ValueError, match="not 3x3 patches"):  # 48 values are no 3x3xC
    model.clone(flexi_patch_size=3).apply(variables, pack)
  with pytest.raises(ValueError, match="flexi_patch_size must be a positive integer"):
    model.clone(flexi_patch_size=-4).apply(variables, pack)
  with pytest.raises(ValueError, match="classifier must be 'gap' or 'map'"):
    model.clone(classifier="token").apply(variables, pack)


# ---------------------------------------------------------------- packing in the trainer


def _stream(sizes, start=0):
  """The classification pipeline's batches of one from example ``start`` on: the naflex
  op's padded dict, image ``i`` filled with ``i`` and labelled ``i``."""
  for i, n in enumerate(sizes[start:], start):
    example = packing.patchify(np.full((4, 4 * n, 3), i, np.float32), 4)
    padded = {"patches": np.zeros((6, 48), np.float32), "positions": np.zeros((6, 2)),
              "segment_ids": np.zeros(6, np.int32), "grid_sizes": example["grid_size"][None]}
    padded["patches"][:n] = example["patches"]
    padded["positions"][:n] = example["positions"]
    padded["segment_ids"][:n] = 1
    yield {"image": {k: v[None] for k, v in padded.items()}, "label": np.array([i])}


def test_packed_batches_count_their_images_and_resume_where_they_stopped():
  sizes = [3, 5, 2, 6, 1, 4, 4, 2, 3, 5, 6, 1, 2]
  batches = list(packing.packed_batches(_stream(sizes), seq_len=8, images_per_pack=3,
                                        packs_per_batch=2))
  assert len(batches) >= 3
  for b in batches:
    assert b["image"]["patches"].shape == (2, 8, 48)
    assert b["image"]["grid_sizes"].shape == (2, 3, 2) and b["label"].shape == (2, 3)
    assert b["_examples"] == int(np.sum(b["label"] >= 0))
    # Each image's patches sit under its own segment id, in its slot's grid.
    for p in range(2):
      for k, label in enumerate(b["label"][p]):
        if label >= 0:
          tokens = b["image"]["patches"][p][b["image"]["segment_ids"][p] == k + 1]
          assert len(tokens) == sizes[label] and (tokens == label).all()
  labels = [l for b in batches for l in b["label"].reshape(-1) if l >= 0]
  assert labels == list(range(len(labels)))  # in order, nothing dropped
  # The stream restarted after the images of the first batch packs the same batches.
  skip = batches[0]["_examples"]
  resumed = packing.packed_batches(_stream(sizes, start=skip), 8, 3, 2)
  for want, got in zip(batches[1:], resumed):
    for key in ("patches", "segment_ids", "positions", "grid_sizes"):
      np.testing.assert_array_equal(got["image"][key], want["image"][key])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_packed_batches_errors():
  on = {"seq_len": 64, "images_per_pack": 8}
  assert packing.from_config({"seq_len": 0}, patch_inputs=True, naflex_model=True,
                             streams=1) is None
  assert packing.from_config(on, patch_inputs=True, naflex_model=True, streams=1) == on
  for patch_inputs, naflex_model in ((False, True), (True, False)):
    with pytest.raises(ValueError, match=r"naflex\(patch_size, max_patches\) and set "
                                         "model.naflex=True"):
      packing.from_config(on, patch_inputs=patch_inputs, naflex_model=naflex_model,
                          streams=1)
  with pytest.raises(ValueError, match="images_per_pack=0: must be >= 1"):
    packing.from_config({"seq_len": 64, "images_per_pack": 0}, patch_inputs=True,
                        naflex_model=True, streams=1)
  with pytest.raises(ValueError, match="multi-process packing is not built"):
    packing.from_config(on, patch_inputs=True, naflex_model=True, streams=2)
  with pytest.raises(ValueError, match="more than the pack's seq_len=4"):
    next(packing.packed_batches(_stream([5]), seq_len=4, images_per_pack=2,
                                packs_per_batch=1))
  with pytest.raises(ValueError, match=r"end the pp with naflex\(patch_size"):
    next(packing.packed_batches([{"image": np.zeros((1, 8, 8, 3)), "label": [0]}], 4, 2, 1))


def test_random_size_op_keeps_the_range_and_is_fixed_at_eval():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  op = preprocess.parse("random_size(16, 48, 8, 2.0)|naflex(8, 36, upsample=False)")
  pairs = preprocess._size_pairs(16, 48, 8, 2.0)  # pylint: disable=protected-access
  assert len(pairs) == 21 and {(16, 32), (48, 24), (48, 48), (16, 16)} <= set(pairs)
  assert all(16 <= s <= 48 and s % 8 == 0 for size in pairs for s in size)
  assert all(0.5 <= h / w <= 2 for h, w in pairs) and (16, 40) not in pairs
  sizes = set()
  for i in range(64):
    out = op({"image": tf.zeros((8, 8, 3)), "_rng": tf.constant([0, i], tf.int64)})
    sizes.add(tuple(int(s) * 8 for s in out["grid_sizes"].numpy()[0]))
  assert sizes <= set(pairs) and len(sizes) >= 15  # 64 draws reach most of the 21
  # Without a seed (evaluation) the size is a function of the pixels: fixed per image.
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (8, 8, 3)), tf.uint8)
  first = op({"image": image})["grid_sizes"].numpy()
  assert (op({"image": image})["grid_sizes"].numpy() == first).all()
  # upsample=False keeps a fitting image's own grid (24x40: 3x5 patches, not ~4x7).
  kept = preprocess.parse("naflex(8, 36, upsample=False)")({"image": tf.zeros((24, 40, 3))})
  assert kept["grid_sizes"].numpy().tolist() == [[3, 5]]
  with pytest.raises(ValueError, match="random_size"):
    preprocess.parse("random_size(48, 16)")


def test_drop_tokens_keeps_a_random_raster_ordered_subset_in_training_only():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (24, 40, 3)), tf.float32)
  full = preprocess.parse("naflex(8, 36, upsample=False)")({"image": image})
  n = int(tf.reduce_sum(full["segment_ids"]))  # 3 x 5 patches
  op = preprocess.parse("naflex(8, 36, upsample=False)|drop_tokens(0.4)")
  chosen = set()
  for i in range(8):
    out = op({"image": image, "_rng": tf.constant([3, i], tf.int64)})
    kept = int(tf.reduce_sum(out["segment_ids"]))
    assert kept == int(np.ceil(0.6 * n)) == 9
    assert out["segment_ids"].numpy().tolist() == [1] * kept + [0] * (36 - kept)
    positions = out["positions"].numpy()[:kept]
    flat = positions[:, 0] * 5 + positions[:, 1]
    assert (np.diff(flat) > 0).all()  # raster order, no repeats
    np.testing.assert_array_equal(out["patches"].numpy()[:kept],
                                  full["patches"].numpy()[flat])
    assert not out["patches"].numpy()[kept:].any()
    chosen.add(tuple(flat))
  assert len(chosen) > 1  # a different subset per example seed
  # Continuous dropping: the rate drawn per image from [0.2, 0.8].
  kept = {int(tf.reduce_sum(preprocess.parse(
      "naflex(8, 36, upsample=False)|drop_tokens(0.2, max_rate=0.8)")(
          {"image": image, "_rng": tf.constant([0, i], tf.int64)})["segment_ids"]))
          for i in range(16)}
  assert len(kept) > 2 and min(kept) >= 3 and max(kept) <= 12
  # Evaluation (no seed): every patch.
  np.testing.assert_array_equal(op({"image": image})["patches"], full["patches"])
  for bad in ("drop_tokens(1.0)", "drop_tokens(-0.1)", "drop_tokens(0.5, max_rate=0.2)"):
    with pytest.raises(ValueError, match="drop_tokens"):
      preprocess.parse(bad)
  with pytest.raises(ValueError, match="after naflex"):
    preprocess.parse("drop_tokens(0.5)")({"image": image, "_rng": tf.constant([0, 0])})


def test_trainer_trains_on_packs_and_resumes_bit_identical(tfds_dir, tmp_path):
  """``configs/digits_naflex.py`` (mixed sizes, packed) for 4 tiny steps; the newest
  checkpoint removed, the rerun resumes at step 2 and reproduces steps 3-4 exactly
  (the packed stream's position is the images consumed, not steps x packs)."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  from vit_jax import config_files  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import classification  # pylint: disable=g-import-not-at-top
  config = config_files.sibling_config(f"{REPO}/configs/x.py", "digits_naflex.py")
  config.input.data_dir = str(tfds_dir)
  config.input.batch_size = 3  # packs of 64 tokens, up to 8 images each
  config.input.update(eval_split="test[:40]", eval_batch_size=40)
  config.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  config.update(total_steps=4, log_every=1, eval_every=4, checkpoint_every=2)
  config.schedule.warmup_steps = 1
  workdir = tmp_path / "run"
  first = classification.train_and_evaluate(config, str(workdir))
  assert [s for s, _ in first["train_loss_history"]] == [1, 2, 3, 4]
  assert first["eval_count"] == 40  # every test digit, at its mixed size
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = classification.train_and_evaluate(config, str(workdir))
  assert resumed["train_loss_history"] == first["train_loss_history"][2:]
  assert resumed["eval_loss"] == first["eval_loss"]
  # More than one image per pack: the position is not steps x packs.
  with open(workdir / "checkpoints" / "4" / "meta" / "metadata") as f:
    assert json.load(f)["examples_seen"] > 4 * 3
