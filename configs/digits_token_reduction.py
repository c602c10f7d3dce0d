r"""The digits ViT at 32x32 (64 patch tokens), for token reduction (docs/token_reduction.md).

Plain training (the model every ToMe r / EViT keep rate is then evaluated on, without
retraining), then short trainings with merging or DynamicViT pruning:

  python -m vit_jax.main --config=configs/digits_token_reduction.py --workdir=workdirs/tr_plain \
      --config.total_steps=500 --config.checkpoint_every=500
  python -m vit_jax.main --config=configs/digits_token_reduction.py --workdir=workdirs/tr_tome \
      --config.model.token_merging=8 --config.init=workdirs/tr_plain --config.total_steps=150
  python -m vit_jax.main --config=configs/digits_token_reduction.py --workdir=workdirs/tr_dyn \
      --config.model.token_pruning=0.7 --config.dynamic_vit.distill_weight=0.5 \
      --config.dynamic_vit.teacher=workdirs/tr_plain \
      --config.init=workdirs/tr_plain --config.total_steps=150
  python -m vit_jax.tools.token_reduction_accuracy --run=plain=workdirs/tr_plain ...

(the doc's runs also set warmup_steps=20 and learning_rate=1e-3 for the 150 steps).

The settings are those of ``configs/digits_vit.py`` (the demo) except the resolution:
digits resized to 32x32, 4x4 patches, so 64 patch tokens plus the class token. The
measured accuracies are in docs/token_reduction.md (full commands there): 500 steps
from scratch 97.78% test top-1; 150 more steps from it at learning rate 1e-3: 98.61%
plain, 98.61% with token_merging=8, 99.17% with token_pruning=0.7 and distillation.
"""

import ml_collections
from ml_collections import config_dict

from vit_jax import config_files


def get_config(arg=None):
  del arg
  config = config_files.sibling_config(__file__, "digits_vit.py")
  config.input.pp_train = "decode|resize(32)|random_crop(32, pad=4)|value_range(-1, 1)"
  config.input.pp_eval = "decode|resize(32)|value_range(-1, 1)"
  config.model.image_size = 32
  # Token reduction (models/token_reduction.py); the defaults build the plain model.
  config.model.token_merging = 0  # ToMe: r tokens merged in every block
  config.model.token_keep_rate = 1.0  # EViT, in blocks (1, 2, 3) of 4
  config.model.token_pruning = 1.0  # DynamicViT's rho, before blocks (1, 2, 3)
  config.model.token_pruning_ratio_weight = 2.0  # the keep-ratio loss (paper: 2.0)
  # Short trainings start from the plain run: its weights, DynamicViT's predictors new.
  config.init = config_dict.placeholder(str)
  config.init_reinit = "score_predictor"
  # DynamicViT distillation from the un-pruned model (trainers/dynamic_vit.py).
  config.dynamic_vit = ml_collections.ConfigDict(dict(distill_weight=0.0, teacher="self"))
  return config
