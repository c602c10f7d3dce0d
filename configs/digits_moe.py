r"""Mixture-of-experts ViTs on the digits: the demo ViT with MoE MLPs in blocks 1 and 3.

  python -m vit_jax.main --config=configs/digits_moe.py:top2 --workdir=workdirs/digits_moe
  python -m vit_jax.main --config=configs/digits_moe.py:soft --workdir=workdirs/digits_soft

`top2` (V-MoE routing: 4 experts, capacity factor 1.25, batch priority, noisy gating,
importance and load losses at vmoe's 0.005), `top1`, `soft` (Soft MoE, 4 slots per
expert), `ewa` (Experts Weights Averaging: random uniform token partition over 4
experts, each averaged halfway toward the others after every update, evaluated as one
averaged MLP; `moe.collapse_ewa` turns the checkpoint into the dense demo ViT's). The routers' losses and statistics go to TensorBoard as `train/moe/*`.

`upcycle` starts from the dense demo's checkpoint: every expert a copy of its block's
MLP, routers fresh (top-2 with renormalised gates and room for every token, so the
upcycled model computes exactly the dense one at step 0), then trains 300 steps:

  python -m vit_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_demo
  python -m vit_jax.main --config=configs/digits_moe.py:upcycle \
      --workdir=workdirs/digits_upcycled --config.init=workdirs/digits_demo

Measured (2-core CPU heavily shared with other jobs, seed 0):
* `top2`, 1,500 steps: 99.44% test top-1 (238,922 parameters; the dense demo, same
  seed and schedule: 98.89%, 139k). Router metrics from step 200 to 1,500:
  importance loss 0.152 -> 0.063, load loss 0.188 -> 0.056, dropped choices
  5.4% -> 1.0%. About 19 minutes on that loaded machine.
* Upcycled from that dense run, evaluated before any update (`--config.total_steps=1
  --config.optimizer.learning_rate=0 --config.schedule.warmup_steps=0`): top-2
  98.89% (= dense); Soft MoE (`--config.model.moe.router=soft`) 98.06% (0.83 points
  below: its slots mix tokens before the experts, so copied experts do not reproduce
  the dense MLP). `upcycle` then trains 300 steps: 98.89%.
* `soft`, 1,500 steps: 98.89% test top-1 (as the dense demo). `top1`: not measured.
* `ewa`, 1,500 steps: 100.00% test top-1 (eval loss 0.0966; one seed, 360 images: 4
  images from the dense 98.89%). Collapsed (`moe.collapse_ewa`) into the dense demo
  ViT: 100.00%, loss 0.0966 (the same model: evaluation runs the averaged experts).
  About 21 minutes on the loaded machine (load ~24).
"""

import ml_collections
from ml_collections import config_dict

from vit_jax import config_files

ROUTERS = ("top2", "top1", "soft", "ewa", "upcycle")


def get_config(arg=None):
  arg = arg or "top2"
  if arg not in ROUTERS:
    raise ValueError(f"configs/digits_moe.py takes one of {ROUTERS}, got {arg!r}")
  config = config_files.sibling_config(__file__, "digits_vit.py")
  # See vit_jax/models/moe.py for every setting.
  config.model.moe = ml_collections.ConfigDict(dict(
      layers=(1, 3), num_experts=4, router="top2" if arg == "upcycle" else arg,
      capacity_factor=1.25, num_slots=4, batch_priority=True, noise_std=1.0,
      importance_loss_weight=0.005, load_loss_weight=0.005, renormalize=False,
      ewa_share=0.5, ewa_every=1, dispatch="einsum"))
  # Expert parallelism: --config.mesh.expert=4 splits the experts over 4 devices
  # (the batch too, outside the MoE layers).
  config.mesh.expert = 1
  if arg == "upcycle":
    config.model.moe.renormalize = True
    config.model.moe.capacity_factor = 2.0  # E / k: every token fits, none dropped
    config.init = config_dict.placeholder(str)  # the dense run's workdir (or any ViT checkpoint of this shape)
    config.init_reinit = r"^head/"  # the routers start fresh by themselves
    config.total_steps = 300
    config.optimizer.learning_rate = 1e-3
    config.schedule.warmup_steps = 50
  return config
