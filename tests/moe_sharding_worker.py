"""Loss and gradients of tiny MoE ViTs under expert-parallel meshes, on 8 virtual CPUs.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/moe_sharding_worker.py OUT

For each router (top-2 with noisy gating, and soft) it computes, with one jit each,
the training loss (cross-entropy plus the routers' auxiliary losses, as the
classification trainer does) and its gradients on one device, with ``expert=8`` and
with ``data=2 x expert=4``, parameters laid out by ``sharding.state_shardings``. It
writes the largest differences from the one-device run, the per-device bytes of the
expert parameters, and whether the compiled step moves tokens with all-to-all.
Top-2 runs both meshes a second time with ``moe.dispatch="all_to_all"`` (the explicit
shard_map exchange), recording the all-to-alls of the *lowered* program too: there,
before XLA's partitioner, only the explicit path has any.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vit_jax import models, sharding  # noqa: E402
from vit_jax.trainers import common  # noqa: E402

MODEL = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
             mlp_dim=64, num_classes=10)
BATCH = 8


def run(router: str, mesh_config: dict, devices, dispatch: str = "einsum") -> dict:
  model = models.create("vit_tiny_patch16_224", **MODEL, moe=dict(
      layers=(1,), num_experts=8, router=router, capacity_factor=1.0, dispatch=dispatch))
  images = jax.random.normal(jax.random.key(1), (BATCH, 16, 16, 3))
  labels = jnp.arange(BATCH) % 10
  params = model.init(jax.random.key(0), images[:1])["params"]
  # Experts start identical (vmoe's default); make them differ so routing matters.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for k, x in zip(keys, leaves)])
  mesh = sharding.make_mesh(mesh_config, devices=devices)
  shardings = sharding.state_shardings(params, mesh)
  params = jax.device_put(params, shardings)
  batch = sharding.batch_sharding(mesh)
  images, labels = jax.device_put(images, batch), jax.device_put(labels, batch)

  def loss_fn(params, images, labels):
    logits, state = model.apply({"params": params}, images, train=True,
                                rngs={"dropout": jax.random.key(3)}, mutable=["aux"])
    _, aux_loss, _ = common.split_auxiliary(state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + aux_loss

  step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(
      sharding.replicated(mesh), shardings))
  with jax.set_mesh(mesh):
    lowered = step.lower(params, images, labels)
    compiled = lowered.compile()
    loss, grads = compiled(params, images, labels)
  experts = {k: v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
             if "Moe/Experts" in sharding.tree.path_name(k)}
  per_device, total = sharding.bytes_per_device(list(experts.values()))
  return {"loss": float(loss), "grads": jax.tree.map(np.asarray, grads),
          "expert_bytes_per_device": per_device, "expert_bytes": total,
          "all_to_all": compiled.as_text().count("all-to-all"),
          "lowered_all_to_all": lowered.as_text().count("all_to_all"),
          "expert_spec": str(shardings["Transformer"]["encoderblock_1"]["Moe"]["Experts"]
                             ["Dense_0"]["kernel"].spec)}


def main(out_path: str):
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  meshes = {"expert8": {"data": 1, "expert": 8}, "data2_expert4": {"data": 2, "expert": 4}}
  # Both meshes for top-2; the composed mesh for soft (compiles are the test's cost).
  for router, names in (("top2", ("expert8", "data2_expert4")), ("soft", ("data2_expert4",))):
    single = run(router, {"data": 1}, devices[:1])
    dispatches = ("einsum", "all_to_all") if router == "top2" else ("einsum",)
    for name, dispatch in [(n, d) for d in dispatches for n in names]:
      mesh_config = meshes[name]
      sharded = run(router, mesh_config, devices, dispatch)
      grad_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(single["grads"]), jax.tree.leaves(sharded["grads"])))
      out[f"{router}/{name}" + ("" if dispatch == "einsum" else f"/{dispatch}")] = {
          "loss_single": single["loss"], "loss": sharded["loss"],
          "loss_diff": abs(single["loss"] - sharded["loss"]), "grad_diff": grad_diff,
          "grad_norm": float(optax.tree.norm(single["grads"])),
          "expert_bytes_per_device": sharded["expert_bytes_per_device"],
          "expert_bytes_single": single["expert_bytes_per_device"],
          "all_to_all": sharded["all_to_all"], "expert_spec": sharded["expert_spec"],
          "lowered_all_to_all": sharded["lowered_all_to_all"]}
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
