"""Contrastive losses: the definitions, and sharded == single-device on 8 devices.

The sharded check runs ``contrastive_sharded_worker.py`` in a subprocess with 8
virtual CPU devices (the flag must be set before JAX starts): loss and gradients of
InfoNCE (gathered columns) and SigLIP (ring of ppermutes, chunked) on meshes
data=8, data=4 x fsdp=2 and data=2 x tensor=4 must equal the single-device
reference within 1e-5 in float32, for losses of order 1.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, subprocess_env
from vit_jax import losses

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sharded_results():
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "contrastive_sharded_worker.py")],
      env=subprocess_env(num_devices=8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["clip/data8", "clip/data4xfsdp2/bias", "siglip/data8",
                                  "siglip/data4xfsdp2/chunk2",
                                  "siglip/data2xtensor4/chunk1"])
def test_sharded_loss_and_gradients_equal_single_device(sharded_results, case):
  result = sharded_results[case]
  assert 0.5 < result["loss_value"] < 5  # order 1: 1e-5 is a float32-level tolerance
  assert result["loss"] <= TOLERANCE
  grads = [k for k in result if k.startswith("grad_") and not k.endswith("_max")]
  assert len(grads) == (4 if "bias" in case or "siglip" in case else 3)
  for name in grads:
    assert result[name] <= TOLERANCE, (name, result[name])
    assert result[f"{name}_max"] > 1e-3 or name == "grad_logit_bias", name
  # The embeddings' gradients stay split over the 8 devices.
  assert result["zimg_grad_sharded"]
  # InfoNCE gathers the embeddings; SigLIP only passes them around the ring.
  if case.startswith("clip"):
    assert "all-gather" in result["collectives"]
  else:
    assert "collective-permute" in result["collectives"]
    assert "all-gather" not in result["collectives"]


def test_sharded_batch_accuracy_matches(sharded_results):
  for kind in ("clip", "siglip"):
    result = sharded_results[f"accuracy/{kind}"]
    assert result["sharded"] == result["reference"]


def test_clip_loss_definition():
  rng = np.random.default_rng(0)
  zimg = rng.normal(size=(6, 4)).astype(np.float32)
  ztxt = rng.normal(size=(6, 4)).astype(np.float32)
  scale = np.float32(np.log(3.0))
  logits = 3.0 * zimg @ ztxt.T
  log_softmax = lambda x, axis: x - np.log(np.exp(x).sum(axis, keepdims=True))
  expected = -(np.trace(log_softmax(logits, 1)) + np.trace(log_softmax(logits, 0))) / 12
  loss, metrics = losses.clip_loss(zimg, ztxt, scale)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics["batch_accuracy"] == np.mean(np.argmax(logits, 1) == np.arange(6))
  # Perfectly aligned, distinct pairs at a high temperature: loss near zero.
  eye = np.eye(6, 4 + 2, dtype=np.float32)
  assert losses.clip_loss(eye, eye, jnp.log(100.0))[0] < 1e-3


def test_siglip_loss_definition():
  rng = np.random.default_rng(1)
  zimg = rng.normal(size=(5, 3)).astype(np.float32)
  ztxt = rng.normal(size=(5, 3)).astype(np.float32)
  logits = 10.0 * zimg @ ztxt.T - 10.0
  z = 2 * np.eye(5) - 1
  expected = np.sum(np.log1p(np.exp(-z * logits))) / 5
  loss, _ = losses.siglip_loss(zimg, ztxt, jnp.log(10.0), jnp.float32(-10.0))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_loss_dispatch_errors():
  z = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="unknown contrastive loss 'triplet'"):
    losses.contrastive_loss("triplet", z, z, 0.0)
  with pytest.raises(ValueError, match="siglip loss needs a logit bias"):
    losses.contrastive_loss("siglip", z, z, 0.0)
  mesh = jax.make_mesh((1,), ("data",))
  with pytest.raises(ValueError, match="chunk_size=3 must divide the per-device batch 4"):
    losses.sharded_siglip_loss(jnp.ones((4, 2)), jnp.ones((4, 2)), 0.0, 0.0, mesh=mesh,
                               axes=("data",), chunk_size=3)
  # Eager calls on plain arrays work, on Explicit (JAX's default) and Auto meshes.
  zimg = jnp.eye(4, 3)
  auto = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  for m in (mesh, auto):
    for kind, bias in (("clip", None), ("siglip", -1.0)):
      sharded = losses.contrastive_loss(kind, zimg, zimg, 1.0, bias, mesh=m, axes=("data",))
      reference = losses.contrastive_loss(kind, zimg, zimg, 1.0, bias)
      np.testing.assert_allclose(sharded[0], reference[0], rtol=1e-6)
