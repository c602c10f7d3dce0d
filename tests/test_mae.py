"""MAE: masking, target and loss against numpy; the encoder sees only the visible
patches; the trainer runs, writes a reconstruction picture, resumes exactly, and its
checkpoint fine-tunes in the classification trainer (encoder kept, decoder dropped);
MAE's, the early exits', MixPro's and ToMe's losses and gradients on 8 virtual devices
equal one device's."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, subprocess_env
from vit_jax import models, tree, weights, workdir
from vit_jax.models import mae

TINY = dict(num_classes=10, image_size=16, patch_size=4, hidden_size=32, num_layers=2,
            num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module", autouse=True)
def eight_device_run(tmp_path_factory):
  """tests/mae_exit_sharding_worker.py on 8 virtual devices, started first and read by
  the last test, so that its compiles overlap the tests in between."""
  out = tmp_path_factory.mktemp("mae8") / "out.json"
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "mae_exit_sharding_worker.py"),
       str(out)], env=subprocess_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  yield proc, out
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def numpy_patches(images, p):
  """Patch (i, j) of the grid, row-major, each flattened as (row, column, channel)."""
  b, h, w, c = images.shape
  out = [images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
         for i in range(h // p) for j in range(w // p)]
  return np.stack(out, axis=1)


def test_masking_keeps_the_lowest_noise_patches():
  noise = np.random.default_rng(0).uniform(size=(3, 16)).astype(np.float32)
  keep = mae.keep_count(16, 0.75)
  assert keep == 4 and mae.keep_count(196, 0.75) == 49
  visible, restore, mask = jax.device_get(mae.masking_from_noise(jnp.asarray(noise), keep))
  expected_visible = np.argsort(noise, axis=1)[:, :keep]
  np.testing.assert_array_equal(visible, expected_visible)
  expected_mask = np.ones((3, 16), np.float32)
  np.put_along_axis(expected_mask, expected_visible, 0.0, axis=1)
  np.testing.assert_array_equal(mask, expected_mask)
  shuffled = np.take_along_axis(np.arange(16)[None].repeat(3, 0),
                                np.argsort(noise, axis=1), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(shuffled, restore, axis=1),
                                np.arange(16)[None].repeat(3, 0))
  with pytest.raises(ValueError, match="mask_ratio"):
    mae.keep_count(16, 1.0)


def test_normalised_pixel_target_and_loss_on_masked_patches_only():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  patches = numpy_patches(images, 4)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, ddof=1, keepdims=True)  # torch's var, as the paper's code
  expected_target = (patches - mean) / np.sqrt(var + 1e-6)
  target = np.asarray(mae.pixel_target(jnp.asarray(images), 4))
  np.testing.assert_allclose(target, expected_target, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mae.pixel_target(jnp.asarray(images), 4, False), patches)
  np.testing.assert_allclose(mae.unpatchify(jnp.asarray(patches), 4, (2, 2)), images)

  pred = rng.normal(size=target.shape).astype(np.float32)
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], np.float32)
  per_patch = ((pred - expected_target) ** 2).mean(-1)
  expected = (per_patch * mask).sum() / mask.sum()
  loss = float(mae.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  pred[mask == 0] += 100.0  # the visible patches do not count
  moved = float(mae.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)))
  np.testing.assert_allclose(moved, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_mae():
  vit = models.create("vit_tiny_patch16_224", **TINY)
  model = mae.MaskedAutoencoder(backbone=mae.masked_vit(vit), decoder_width=32,
                                decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init({"params": jax.random.key(1), "mask": jax.random.key(2)}, images)
  return vit, model, variables, images


def test_encoder_runs_on_visible_patches_with_the_vit_parameter_names(tiny_mae):
  vit, model, variables, images = tiny_mae
  vit_names = set(tree.flatten(vit.init(jax.random.key(0), images)["params"]))
  encoder_names = {k[len("encoder/"):] for k in tree.flatten(variables["params"])
                   if k.startswith("encoder/")}
  assert encoder_names == vit_names - {"head/kernel", "head/bias"}

  apply = jax.jit(lambda x: model.apply(variables, x, rngs={"mask": jax.random.key(7)}))
  pred, mask = apply(images)
  assert pred.shape == (2, 16, 48) and mask.shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), [12, 12])
  # Pixels of hidden patches cannot reach the prediction; a visible patch's do.
  pixel_mask = mae.unpatchify(jnp.repeat(mask[..., None], 48, -1), 4, (4, 4))
  hidden_changed = images + 5.0 * pixel_mask
  np.testing.assert_array_equal(apply(hidden_changed)[0], pred)
  visible_changed = images + 5.0 * (1 - pixel_mask)
  assert not np.allclose(apply(visible_changed)[0], pred)


def test_mae_needs_a_plain_vit():
  with pytest.raises(ValueError, match="plain ViT"):
    mae.masked_vit(models.create("deit_tiny_distilled_patch16_224", num_classes=0))


def mae_config(tfds_dir):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import digits_mae  # pylint: disable=g-import-not-at-top
  config = digits_mae.get_config()
  config.input.data_dir = tfds_dir
  config.input.batch_size = 32
  config.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  config.mae.update(decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64)
  config.total_steps, config.schedule.warmup_steps = 4, 1
  config.log_every, config.eval_every, config.checkpoint_every = 2, 0, 2
  config.keep_checkpoints = 2  # the resume test cuts back to step 2
  return config


@pytest.fixture(scope="module")
def mae_run(tfds_dir, tmp_path_factory):
  """4 tiny MAE steps, checkpoints at 2 and 4: ``(config, workdir, result)``."""
  from vit_jax.trainers import mae as mae_trainer  # pylint: disable=g-import-not-at-top
  config = mae_config(tfds_dir)
  path = tmp_path_factory.mktemp("mae_run") / "mae"
  return config, path, mae_trainer.train_and_evaluate(config, str(path))


def test_mae_trainer_then_fine_tune_loads_the_encoder(mae_run):
  config, mae_dir, result = mae_run
  assert result["step"] == 4 and np.isfinite(result["eval_loss"])
  events = list((mae_dir / "tensorboard").iterdir())
  assert events and any(e.stat().st_size > 1000 for e in events)  # holds the picture

  # config.init=<the MAE workdir> in the classification trainer goes through this.
  vit = models.create(config.model_name, num_classes=10, **config.model.to_dict())
  fresh = vit.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables, report = weights.load(str(mae_dir), vit, fresh,
                                   model_name=config.model_name, reinit=r"^head/")
  assert "MAE checkpoint: encoder kept, decoder dropped" in report.summary()
  assert "decoder_pred" in report.format and "mask_token" in report.format
  assert sorted(report.reinitialised) == ["head/bias", "head/kernel"]
  saved = tree.flatten(workdir.read_variables(str(mae_dir))[0]["params"])
  for name, value in tree.flatten(variables["params"]).items():
    if not name.startswith("head/"):
      np.testing.assert_array_equal(value, saved["encoder/" + name])


def test_mae_resumes_exactly(mae_run, tmp_path, capsys):
  """Cut back to step 2 (a kill after that save), rerun: step 4 is bit-identical."""
  from resume_check import assert_same_state, cut_back  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import mae as mae_trainer  # pylint: disable=g-import-not-at-top
  config, mae_dir, result = mae_run
  killed = cut_back(mae_dir, tmp_path / "killed", 2)
  resumed = mae_trainer.train_and_evaluate(config, killed)
  assert "/killed/checkpoints/2 (step 2)" in capsys.readouterr().out
  assert resumed["step"] == 4 and resumed["eval_loss"] == result["eval_loss"]
  assert assert_same_state(mae_dir, killed, 4) > 50


def test_mae_exit_and_mixpro_losses_on_8_devices_equal_one_device(eight_device_run):
  """data=8 (data=2, fsdp=4 for ToMe): loss and every gradient within 1e-5 of one
  device's, for MAE, the early exits, MixPro and ToMe token merging."""
  proc, out = eight_device_run
  _, stderr = proc.communicate(timeout=900)
  assert proc.returncode == 0, stderr[-3000:]
  with open(out) as f:
    results = json.load(f)
  assert sorted(results) == ["exits/data8", "mae/data8", "mixpro/data8",
                             "qat/data2_fsdp4", "tome/data2_fsdp4"]
  for name, result in results.items():
    assert result["grad_norm"] > 0.1, (name, result)  # not trivially zero gradients
    if name.startswith("qat/"):  # int8 rounding: a float-noise difference that moves a
      # value across a rounding boundary becomes one quantization step. Relative, like
      # the gradients' bound: 1.24e-3 of a 2.30 loss on an Intel Xeon (AVX-512) host.
      assert result["loss_diff"] <= 1e-3 * result["loss_single"], (name, result)
      assert result["grad_diff"] <= 0.01 * result["grad_norm"], (name, result)
      continue
    assert result["loss_diff"] <= 1e-5 and result["grad_diff"] <= 1e-5, (name, result)
  assert results["mae/data8"]["num_grads"] > 30 and results["exits/data8"]["num_grads"] == 87
  assert results["mixpro/data8"]["num_grads"] > 10
  assert results["tome/data2_fsdp4"]["tokens"] == [13, 9]  # 17 tokens, 4 merged per block
