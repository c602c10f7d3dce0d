"""MAE and early-exit losses and gradients on 8 virtual CPUs against one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mae_exit_sharding_worker.py OUT

Two training losses, each computed with one jit on one device and on 8 devices
(``data=8``), parameters laid out by ``sharding.state_shardings`` and the batch split
by ``sharding.batch_sharding``, as the trainers do:

- MAE: the trainer's loss (random masking from a step key, encoder on the visible
  patches, decoder, normalised-pixel MSE on the masked patches) and its gradients.
- Early exits: LGViT's two losses on a 3-block ViT with a local-perception and a
  global-aggregation exit: stage 1's (``early_exit.stage1_loss``, backbone and exits
  end to end) plus stage 2's (``early_exit.exit_loss``, self-distillation from the
  final head), and the gradients of the sum for the backbone and the exits.
- QAT: the classification trainer's loss through an int8 fake-quantized ViT
  (``config.quantization``), on ``data=2 x fsdp=4`` (batch and parameters split).
- MixPro: the classification trainer's MixPro loss (MaskMix from a step key, the last
  block's class attention captured in the same forward, progressive attention labels,
  cross-entropy on them) and its gradients.
- Token reduction (``token_reduction_results``): the classification loss of a ViT with
  ToMe merging on a ``data=2, fsdp=4`` mesh with every array sharded.

Writes, per loss and mesh, the largest differences from the one-device run.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vit_jax import finetune, models, quantization, sharding  # noqa: E402
from vit_jax.models import early_exit, mae  # noqa: E402
from vit_jax.trainers import common  # noqa: E402

# The smallest models that exercise each path (compiles are the test's cost): a 1-block
# MAE encoder, a 2-block ViT with one exit.
VIT = dict(num_classes=10, image_size=16, patch_size=4, hidden_size=32, num_layers=1,
           num_heads=2, mlp_dim=64)
EXITS = (0, 1)
BATCH = 16
MESHES = {"data8": {"data": 8}}
QAT_MESHES = {"data2_fsdp4": {"data": 2, "fsdp": 4}}  # both axes, one compile


def perturbed(tree, seed):
  """Zero-initialised heads (Flax's, the timm default) would make the exit loss
  trivial; every array gets a small random offset."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def mae_case():
  model = mae.MaskedAutoencoder(backbone=mae.masked_vit(models.create(
      "vit_tiny_patch16_224", **VIT)), decoder_width=32, decoder_depth=1, decoder_heads=2,
      decoder_mlp_dim=64)
  images = jax.random.normal(jax.random.key(0), (BATCH, 16, 16, 3))
  params = perturbed(model.init({"params": jax.random.key(1), "mask": jax.random.key(2)},
                                images[:1])["params"], 8)
  rngs = {"mask": jax.random.key(3), "dropout": jax.random.key(4)}

  def loss_fn(params, frozen, images):  # as trainers/mae.py's loss_fn
    del frozen
    pred, mask = model.apply({"params": params}, images, train=True, rngs=rngs)
    return mae.mae_loss(pred, mae.pixel_target(images, 4), mask)

  return loss_fn, params, {}, (images,)


def exit_case():
  vit = models.create("vit_tiny_patch16_224", **{**VIT, "num_layers": 3})
  images = jax.random.normal(jax.random.key(5), (BATCH, 16, 16, 3))
  labels = jnp.arange(BATCH) % 10
  backbone = perturbed(vit.init(jax.random.key(6), images[:1]), 9)["params"]
  heads = early_exit.ExitHeads(EXITS, 10, kinds=("local", "global"), num_heads=2)
  _, inter = models.forward_intermediates(vit, {"params": backbone}, images[:1])
  exits = perturbed(heads.init(jax.random.key(7), early_exit.block_tokens(
      inter, EXITS))["params"], 10)

  def loss_fn(params, frozen, images, labels):  # as tools/early_exit.py's steps
    del frozen
    final, inter = models.forward_intermediates(vit, {"params": params["backbone"]},
                                                images)
    tokens = early_exit.block_tokens(inter, EXITS)
    stage1 = early_exit.stage1_loss(heads.apply({"params": params["exits"]}, tokens),
                                    final, labels, (0.5, 1.0))
    return stage1 + early_exit.exit_loss(heads, params["exits"], tokens, final, labels)

  return loss_fn, {"backbone": backbone, "exits": exits}, {}, (images, labels)


def mixpro_case():
  vit = models.create("vit_tiny_patch16_224", **VIT)
  images = jax.random.normal(jax.random.key(11), (BATCH, 16, 16, 3))
  labels = jnp.arange(BATCH) % 10
  params = perturbed(vit.init(jax.random.key(12), images[:1])["params"], 13)

  def loss_fn(params, frozen, images, labels):  # as trainers/classification.py's
    del frozen
    mixed, patch_mask, area_lam = finetune.mask_mix(
        jax.random.key(14), images, alpha=1.0, cell=8, patch_size=4)
    logits, state = vit.apply({"params": params}, mixed, train=True,
                              rngs={"dropout": jax.random.key(15)},
                              mutable=["intermediates"],
                              capture_intermediates=finetune.last_block_qk_filter(vit))
    targets = finetune.attention_labels(
        finetune.last_block_class_attention(state["intermediates"], vit), patch_mask,
        area_lam, jax.nn.softmax(logits), labels, 10)[0]
    return optax.softmax_cross_entropy(logits, targets).mean()

  return loss_fn, params, {}, (images, labels)


def qat_case():
  """The classification trainer's loss through QAT (``quantization.from_config``,
  int8: fake-quantized dots with per-token activation and per-channel weight scales)."""
  vit = quantization.from_config(models.create("vit_tiny_patch16_224", **VIT),
                                 {"mode": "int8"})
  images = jax.random.normal(jax.random.key(16), (BATCH, 16, 16, 3))
  labels = jnp.arange(BATCH) % 10
  params = perturbed(vit.init(jax.random.key(17), images[:1])["params"], 18)

  def loss_fn(params, frozen, images, labels):
    del frozen
    logits = vit.apply({"params": params}, images, train=True,
                       rngs={"dropout": jax.random.key(19)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn, params, {}, (images, labels)


def token_reduction_case(**setting):
  """The classification trainer's loss (cross-entropy plus the ``aux`` losses that
  DynamicViT sows) of a 2-block ViT with one token-reduction setting, in training mode
  (dropout and DynamicViT's Gumbel keys)."""
  vit = models.create("vit_tiny_patch16_224", **{**VIT, "num_layers": 2}, **setting)
  images = jax.random.normal(jax.random.key(16), (BATCH, 16, 16, 3))
  labels = jnp.arange(BATCH) % 10
  variables = vit.init(jax.random.key(17), images[:1])
  params = perturbed(variables["params"], 18)
  inter = jax.eval_shape(lambda p, x: models.forward_intermediates(vit, {"params": p}, x)[1],
                         params, images[:1])
  tokens = [inter[f"Transformer/block_{i}"].shape[1] for i in range(2)]  # at inference

  def loss_fn(params, frozen, images, labels):
    del frozen
    logits, state = vit.apply({"params": params}, images, train=True,
                              rngs={"dropout": jax.random.key(19)},
                              mutable=["intermediates", "aux"])
    _, aux_loss, _ = common.split_auxiliary(state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + aux_loss

  return (loss_fn, params, {}, (images, labels)), tokens


def token_reduction_results(devices) -> dict:
  """ToMe's loss and gradients on 8 devices against one, its arrays sharded whatever
  their size (``fsdp_min_size=0``). EViT's top-k and gathers are ToMe's static-shape
  pattern, left out to save compiles."""
  out = {}
  # One mesh with both axes (the batch is split over data and fsdp), one compile: each
  # costs ~7 s here. DynamicViT's training mode (Gumbel keys) matched too (<= 1.6e-7,
  # docs/token_reduction.md) but is left out to keep the suite's time.
  for name, setting, meshes in (
      ("tome", dict(token_merging=4), {"data2_fsdp4": {"data": 2, "fsdp": 4}}),):
    case, tokens = token_reduction_case(**setting)
    loss1, grads1 = run(case, sharding.make_mesh({"data": 1}, devices=devices[:1]))
    for mesh_name, mesh_config in meshes.items():
      loss8, grads8 = run(case, sharding.make_mesh(mesh_config, devices=devices),
                          {"fsdp_min_size": 0})
      out[f"{name}/{mesh_name}"] = {
          "loss_single": loss1, "loss": loss8, "loss_diff": abs(loss1 - loss8),
          "grad_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(
              jax.tree.leaves(grads1), jax.tree.leaves(grads8))),
          "grad_norm": float(optax.tree.norm(grads1)),
          "num_grads": len(jax.tree.leaves(grads1)), "tokens": tokens}
  return out


def run(case, mesh, sharding_config=None):
  """Loss and gradients with the trained params laid out by the trainers' rules, frozen
  ones replicated, the batch split."""
  loss_fn, params, frozen, batch = case
  # fsdp_min_size 0 by default: under fsdp=8 every array that can be split is (as in
  # test_sharding).
  params = jax.device_put(params, sharding.state_shardings(
      params, mesh, sharding_config or {"fsdp_min_size": 0}))
  frozen = jax.device_put(frozen, sharding.replicated(mesh))
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, frozen, *batch)
  return float(loss), jax.tree.map(np.asarray, grads)


def main(out_path: str):
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  for name, make, meshes in (("mae", mae_case, MESHES), ("exits", exit_case, MESHES),
                             ("mixpro", mixpro_case, MESHES), ("qat", qat_case, QAT_MESHES)):
    case = make()
    loss1, grads1 = run(case, sharding.make_mesh({"data": 1}, devices=devices[:1]))
    for mesh_name, mesh_config in meshes.items():
      loss8, grads8 = run(case, sharding.make_mesh(mesh_config, devices=devices))
      out[f"{name}/{mesh_name}"] = {
          "loss_single": loss1, "loss": loss8, "loss_diff": abs(loss1 - loss8),
          "grad_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(
              jax.tree.leaves(grads1), jax.tree.leaves(grads8))),
          "grad_norm": float(optax.tree.norm(grads1)),
          "num_grads": len(jax.tree.leaves(grads1))}
  out.update(token_reduction_results(devices))
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
