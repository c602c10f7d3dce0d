"""Runs the trainer under several meshes in ONE process with 8 virtual CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py JOBS

``JOBS`` is a JSON file: ``{"tfds_dir", "out", "runs": [{"name", "workdir",
"copy_from" (optional: a workdir to start from), "wait_for" (optional: a file to wait
for first), "kwargs"}]}``; each run calls
``helpers.train_in_process(tfds_dir, workdir, **kwargs)``. The results (the trainer's
result dicts) go to ``out``, together with the per-device bytes of ViT-B/16's train
state under FSDP (abstract: nothing is allocated) and the collectives in the compiled
forward pass of ``collectives_model`` under tensor parallelism and FSDP, and for the
``tensor_parallel`` models of other families the loss on one device and with
``tensor=2`` and their compiled collectives. One interpreter start for all the meshes
keeps the test time down (see tests/test_sharding.py).
"""

import collections
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from helpers import train_in_process  # noqa: E402


def vit_b16_state_bytes(mesh_config: dict) -> dict:
  """Per-device and total bytes of ViT-B/16 params + AdamW state under a mesh."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax import models, optim, sharding  # pylint: disable=g-import-not-at-top
  model = models.create("vit_base_patch16_224")
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
  opt_config = ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.05))
  tx = optim.make_optimizer(opt_config, optim.learning_rate_schedule(1e-3, 10), params)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
  mesh = sharding.make_mesh(mesh_config)
  shardings = sharding.state_shardings(state, mesh)  # the default rules
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  per_device, total = sharding.bytes_per_device(abstract)
  # What the rules leave replicated on purpose: arrays under fsdp_min_size.
  small = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
              if x.size < sharding.DEFAULT_FSDP_MIN_SIZE)
  return {"per_device": per_device, "total": total, "small_replicated": small}


def forward_collectives(mesh_config: dict, **model_overrides) -> dict:
  """Counts of each collective in the compiled forward pass of a sharded ViT."""
  from vit_jax import models, sharding  # pylint: disable=g-import-not-at-top
  model = models.create("vit_tiny_patch16_224", **model_overrides)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))["params"]
  mesh = sharding.make_mesh(mesh_config)
  shardings = sharding.state_shardings(params, mesh, {"fsdp_min_size": 0})
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)
  images = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(
        params, images).compile().as_text()
  ops = re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|"
                   r"collective-permute)(?:-start)?\(", hlo)
  return dict(collections.Counter(ops))


def tensor_parallel(job: dict) -> dict:
  """A model's loss on one device and on ``data=4 x tensor=2`` (default rules), and
  the collectives of its compiled forward pass on that mesh.

  ``job``: ``{"model", "overrides", "side"}``; ``side`` None embeds texts only (the
  text tower of a two-tower model). Random parameters (``random_variables``), eval
  mode, a cross-entropy over the batch.
  """
  from random_variables import random_variables  # pylint: disable=g-import-not-at-top
  from vit_jax import models, sharding, tree  # pylint: disable=g-import-not-at-top
  model = models.create(job["model"], **job["overrides"])
  batch = 8
  if job["side"] is None:
    inputs = {"texts": jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (batch, 1))
                       % jnp.arange(1, batch + 1, dtype=jnp.int32)[:, None]}
    variables = random_variables(model, **inputs)
    # Per-example logits: the text embeddings through a fixed random projection.
    probe = jax.random.normal(jax.random.key(2), (model.embed_dim, 10))
    logits_of = lambda v, x: model.apply(v, texts=x)[1] @ probe
  else:
    inputs = {"images": jax.random.normal(jax.random.key(1),
                                          (batch, job["side"], job["side"], 3))}
    variables = random_variables(model, inputs["images"])
    logits_of = lambda v, x: model.apply(v, x)
  (x,) = inputs.values()
  labels = jnp.arange(batch) % 10
  loss_of = lambda v, x: -jnp.mean(
      jax.nn.log_softmax(logits_of(v, x))[jnp.arange(batch), labels])
  single = float(jax.jit(loss_of)(variables, x))
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  shardings = sharding.state_shardings(variables, mesh)
  split = sorted(tree.path_name(p) for p, s in
                 jax.tree_util.tree_flatten_with_path(shardings)[0] if "tensor" in str(s.spec))
  variables = jax.device_put(variables, shardings)
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    sharded = float(jax.jit(loss_of)(variables, x))
    hlo = jax.jit(logits_of).lower(variables, x).compile().as_text()
  ops = collections.Counter(re.findall(
      r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
      r"(?:-start)?\(", hlo))
  # XLA may combine independent all-reduces into one op: count the values reduced.
  reduced = sum(len(re.findall(r"%[\w.-]+", operands)) for operands in re.findall(
      r"= [^=]*? all-reduce(?:-start)?\(([^)]*)\)", hlo))
  return {"single": single, "tensor2": sharded, "collectives": dict(ops),
          "all_reduced_values": reduced, "split": split}


def main(jobs_file: str) -> None:
  with open(jobs_file) as f:
    jobs = json.load(f)
  assert jax.device_count() == 8, jax.devices()
  out = {"runs": {}}
  for run in jobs["runs"]:
    if run.get("wait_for"):  # a file the test process writes when the input is ready
      deadline = time.time() + 1200
      while not os.path.exists(run["wait_for"]):
        if time.time() > deadline:
          raise TimeoutError(f"{run['wait_for']} never appeared")
        time.sleep(0.2)
    if run.get("copy_from"):
      shutil.copytree(run["copy_from"], run["workdir"])
    result = train_in_process(jobs["tfds_dir"], run["workdir"], **run["kwargs"])
    out["runs"][run["name"]] = result
  out["vit_b16_fsdp8"] = vit_b16_state_bytes({"data": 1, "fsdp": 8, "tensor": 1})
  tiny = jobs["collectives_model"]
  out["collectives"] = {
      "data2_tensor4": forward_collectives({"data": 2, "fsdp": 1, "tensor": 4}, **tiny),
      "fsdp8": forward_collectives({"data": 1, "fsdp": 8, "tensor": 1}, **tiny)}
  out["tensor_parallel"] = {name: tensor_parallel(job)
                            for name, job in jobs.get("tensor_parallel", {}).items()}
  with open(jobs["out"], "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1])
