"""BatchNorm under data parallelism: statistics over the global batch, not per device.

EfficientViT-M and SHViT keep BatchNorm running statistics in ``batch_stats``. The
trainer runs one ``jax.jit`` step on a batch sharded over the mesh's data axis, so a
batch mean inside the model is a mean over the global array: XLA adds the
cross-device reduction. This checks it on 8 simulated CPU devices, in a subprocess
(the device count is fixed when JAX starts): the training-mode forward pass that
produces the new statistics (``mutable=["batch_stats"]``, as in the trainer's step),
jitted over a batch sharded 8 ways, gives the statistics (and outputs) of the same
pass on 1 device with the same global batch, and differs from statistics taken over
one device's shard. Small one-stage models with random parameters keep the XLA
compiles short.
"""

import json
import subprocess
import sys

from helpers import subprocess_env

SCRIPT = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
from vit_jax import models, sharding

assert jax.device_count() == 8, jax.devices()
CASES = {
    "efficientvit_m0": dict(embed_dims=(16,), key_dims=(4,), depths=(1,), num_heads=(2,),
                            window_sizes=(7,), kernels=(3, 3), image_size=32),
    "shvit_s1": dict(embed_dims=(16,), partial_dims=(8,), qk_dims=(4,), depths=(1,),
                     mixers=("s",)),
}
rng = np.random.RandomState(0)
# Examples with different statistics per device shard: shard d is shifted by d.
images = (rng.randn(16, 32, 32, 3) + np.repeat(np.arange(8), 2)[:, None, None, None]
          ).astype(np.float32)
report = {}
for name, overrides in CASES.items():
  model = models.create(name, num_classes=10, **overrides)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])
  params = jax.tree.map(lambda s: (0.3 * rng.randn(*s.shape)).astype(np.float32),
                        shapes["params"])
  model_state = {"batch_stats": jax.tree.map(
      lambda s: np.ones(s.shape, np.float32), shapes["batch_stats"])}

  def step(params, model_state, images):
    return model.apply({"params": params, **model_state}, images, train=True,
                       mutable=["batch_stats"])

  results = {}
  for count in (8, 1):
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:count])
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    with jax.set_mesh(mesh):
      fn = jax.jit(step, in_shardings=(replicated, replicated, batch),
                   out_shardings=(batch, replicated))
      sharded = jax.device_put(images, batch)
      assert len(sharded.addressable_shards) == count
      results[count] = jax.device_get(fn(params, model_state, sharded))
  # One device's shard alone: what per-device statistics would have given.
  _, local = jax.device_get(jax.jit(step)(params, model_state, images[:2]))

  def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  stats = results[1][1]
  report[name] = {
      "stats_8_vs_1": max_diff(results[8][1], stats),
      "logits_8_vs_1": max_diff(results[8][0], results[1][0]),
      "largest_stat": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(stats)),
      "stats_moved": max_diff(stats, model_state),
      "stats_global_vs_shard": max_diff(stats, local),
      "num_stats": len(jax.tree.leaves(stats)),
  }
print("REPORT", json.dumps(report))
"""


def test_batch_stats_are_global_under_data_parallelism():
  env = subprocess_env(8)
  # LLVM's optimisations dominate XLA's CPU compile time and do not matter for what is
  # compared here (both meshes run under the same flags).
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT "))
  report = json.loads(line[len("REPORT "):])
  assert sorted(report) == ["efficientvit_m0", "shvit_s1"]
  for name, r in report.items():
    assert r["num_stats"] >= 20, (name, r)
    assert r["stats_moved"] > 1e-2, (name, r)  # the pass updated the statistics
    # Per-device statistics would differ this much; 8 devices match 1 device up to
    # float32 rounding of differently ordered sums.
    assert r["stats_global_vs_shard"] > 0.1, (name, r)
    assert r["stats_8_vs_1"] <= 1e-6 * max(r["largest_stat"], 1.0), (name, r)
    assert r["logits_8_vs_1"] < 1e-4, (name, r)
