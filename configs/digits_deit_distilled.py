r"""DeiT-style distillation on the digits: a small distilled DeiT learns from the demo ViT.

Train the teacher (the digits demo, `configs/digits_vit.py`), then the student, a
distilled DeiT with a fifth of the teacher's width and half its depth (~20k vs 139k
parameters), whose distillation head learns the teacher's hard predictions:

  python -m vit_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_demo
  python -m vit_jax.main --config=configs/digits_deit_distilled.py \
      --workdir=workdirs/digits_deit \
      --config.distillation.teacher_checkpoint=workdirs/digits_demo

`:baseline` trains the same student without a teacher (both heads on the labels):

  python -m vit_jax.main --config=configs/digits_deit_distilled.py:baseline \
      --workdir=workdirs/digits_deit_baseline

Measured (2-core CPU, 1,500 steps each, seeds 0 / 1): teacher 99.17% test top-1;
distilled student 98.89% / 98.33%; baseline student 98.89% / 98.61%. Distillation does
not raise the final accuracy on this easy task (1-2 of 360 digits apart); the distilled
student learns faster (95.3% / 94.2% at step 500 vs 90.3% / 93.1%). About 3 minutes per
run on a loaded 2-core machine.
"""

import ml_collections

from vit_jax import config_files


def get_config(arg=None):
  if arg not in (None, "", "baseline"):
    raise ValueError(f"unknown config argument {arg!r}; use nothing or 'baseline'")
  config = config_files.sibling_config(__file__, "digits_vit.py")
  teacher = config.model.to_dict()  # the demo ViT's settings

  config.model_name = "deit_tiny_distilled_patch16_224"
  config.model = ml_collections.ConfigDict(dict(
      image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
      mlp_dim=64, dropout_rate=0.0, drop_path_rate=0.1))

  if arg == "baseline":
    config.distillation = None
  else:
    config.distillation = ml_collections.ConfigDict(dict(
        teacher_model="vit_tiny_patch16_224",
        teacher=teacher,
        teacher_checkpoint="workdirs/digits_demo",
        type="hard",  # DeiT's best: the teacher's argmax labels the distillation head
        alpha=0.5,
        tau=1.0))
  return config
