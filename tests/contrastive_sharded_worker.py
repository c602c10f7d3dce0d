"""Compares the sharded contrastive losses with the single-device references.

Run by ``test_contrastive_losses.py`` in a subprocess with 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before JAX starts).
Prints one JSON object: per case, the max |difference| of the loss and of every
gradient, and which collectives the compiled sharded program contains.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import losses, sharding

jax.config.update("jax_default_matmul_precision", "highest")


def normalized(key, shape):
  x = jax.random.normal(key, shape, jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def run_case(kind, mesh_config, batch=32, dim=16, chunk_size=None, bias=True):
  mesh = sharding.make_mesh(mesh_config)
  k1, k2 = jax.random.split(jax.random.key(len(str(mesh_config)) + batch))
  zimg = normalized(k1, (batch, dim))
  # Correlate the pairs a little so the diagonal matters.
  ztxt = normalized(k2, (batch, dim)) + 0.5 * zimg
  ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
  # Losses of order 1, so that 1e-5 is a float32-level tolerance.
  t = jnp.float32(np.log(10.0))
  b = (jnp.float32(-2.0 if kind == "clip" else -5.0)) if bias else None
  reference = losses.clip_loss if kind == "clip" else losses.siglip_loss

  def ref_fn(zimg, ztxt, t, b):
    return reference(zimg, ztxt, t, b)[0]

  def sharded_fn(zimg, ztxt, t, b):
    return losses.contrastive_loss(kind, zimg, ztxt, t, b, mesh=mesh,
                                   chunk_size=chunk_size)[0]

  argnums = (0, 1, 2, 3) if bias else (0, 1, 2)
  ref_loss, ref_grads = jax.value_and_grad(ref_fn, argnums)(zimg, ztxt, t, b)
  split = NamedSharding(mesh, P(sharding.BATCH_AXES))
  zimg_s, ztxt_s = jax.device_put(zimg, split), jax.device_put(ztxt, split)
  step = jax.jit(jax.value_and_grad(sharded_fn, argnums))
  with jax.set_mesh(mesh):
    loss, grads = step(zimg_s, ztxt_s, t, b)
    hlo = step.lower(zimg_s, ztxt_s, t, b).compile().as_text()
  diffs = {"loss": float(abs(loss - ref_loss)), "loss_value": float(ref_loss)}
  for name, g, rg in zip(("zimg", "ztxt", "logit_scale", "logit_bias"), grads, ref_grads):
    diffs[f"grad_{name}"] = float(jnp.max(jnp.abs(g - rg)))
    diffs[f"grad_{name}_max"] = float(jnp.max(jnp.abs(rg)))
  diffs["zimg_grad_sharded"] = bool(len(grads[0].sharding.device_set) == 8)
  diffs["collectives"] = sorted(c for c in ("all-gather", "collective-permute",
                                            "all-reduce", "reduce-scatter")
                                if c in hlo)
  return diffs


def main():
  assert jax.device_count() == 8, jax.devices()
  results = {
      "clip/data8": run_case("clip", {"data": 8}, bias=False),
      "clip/data4xfsdp2/bias": run_case("clip", {"data": 4, "fsdp": 2}),
      "siglip/data8": run_case("siglip", {"data": 8}),
      "siglip/data4xfsdp2/chunk2": run_case("siglip", {"data": 4, "fsdp": 2},
                                            chunk_size=2),
      "siglip/data2xtensor4/chunk1": run_case("siglip", {"data": 2, "tensor": 4},
                                              batch=8, chunk_size=1),
  }
  # The metrics agree too.
  mesh = sharding.make_mesh({"data": 8})
  zimg = normalized(jax.random.key(5), (16, 8))
  ztxt = normalized(jax.random.key(6), (16, 8))
  with jax.set_mesh(mesh):
    for kind, b in (("clip", None), ("siglip", jnp.float32(-1.0))):
      ref = (losses.clip_loss if kind == "clip" else losses.siglip_loss)(
          zimg, ztxt, jnp.float32(2.0), b)[1]["batch_accuracy"]
      got = jax.jit(lambda a, c: losses.contrastive_loss(
          kind, a, c, jnp.float32(2.0), b, mesh=mesh))(zimg, ztxt)[1]["batch_accuracy"]
      results[f"accuracy/{kind}"] = {"reference": float(ref), "sharded": float(got)}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
