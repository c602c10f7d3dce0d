r"""A small ViT on scikit-learn's handwritten digits: the offline demo (`make demo`).

  python -m vit_jax.main --config=configs/digits_vit.py --workdir=workdirs/digits_demo

Expected: test top-1 ≈ 98% on the 360 held-out digits, about 2 minutes of training on
a 2-core CPU (see README for the measured number). The dataset is built offline from
the copy inside scikit-learn on first use.

MixPro (README, "MixPro"), a DeiT-T-style run of 500 steps with and without it:

  python -m vit_jax.main --config=configs/digits_vit.py:mixpro --workdir=workdirs/mixpro
  python -m vit_jax.main --config=configs/digits_vit.py:mixpro_baseline \
      --workdir=workdirs/mixpro_baseline

Measured (2-core CPU, seed 0, 360 test digits, one run each): 97.78% with MixPro
(alpha 1, 8-pixel cells: a 2x2 grid of 2x2 patches), 96.67% without it; an earlier
pair on older code gave 96.67% with and 98.61% without (README: run-to-run spread).
"""

import ml_collections
from ml_collections import config_dict


VARIANTS = ("", "mixpro", "mixpro_baseline")


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"configs/digits_vit.py takes nothing, 'mixpro' or "
                     f"'mixpro_baseline', got {arg!r}")
  config = ml_collections.ConfigDict()
  config.trainer = "classification"
  config.seed = 0

  config.input = ml_collections.ConfigDict()
  config.input.dataset = "digits"
  config.input.data_dir = config_dict.placeholder(str)  # TFDS default (~/tensorflow_datasets)
  config.input.download = False
  config.input.train_split = "train"
  config.input.eval_split = "test"
  config.input.batch_size = 128
  config.input.eval_batch_size = 360
  config.input.shuffle_buffer = 2_000
  config.input.cache = True
  # The training stream is read as this many shards (default: one per process); fix
  # it to reproduce a multi-host run on one process, or to resume on other hosts.
  config.input.data_shards = config_dict.placeholder(int)
  # 8x8 digits upsampled to 16x16; shifts of up to 2 pixels as augmentation.
  config.input.pp_train = "decode|resize(16)|random_crop(16, pad=2)|value_range(-1, 1)"
  config.input.pp_eval = "decode|resize(16)|value_range(-1, 1)"

  # A registered ViT with its size overridden: 16 tokens of 4x4 pixels, width 64.
  config.model_name = "vit_tiny_patch16_224"
  config.model = ml_collections.ConfigDict(dict(
      image_size=16, patch_size=4, hidden_size=64, num_layers=4, num_heads=4,
      mlp_dim=128, dropout_rate=0.0, drop_path_rate=0.1,
      # Memory options: remat_policy "none" | "full" | "dots_saveable" | ...;
      # scan_layers stacks the blocks' parameters (see vit_jax/models/vit.py).
      remat_policy="none", scan_layers=False))

  # name: "adamw" or "sgd" (momentum, nesterov); weight decay applies to parameters
  # whose name matches wd_pattern (Flax "kernel"s: no decay on biases and norms).
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-3, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9,
      nesterov=False, weight_decay=0.05, wd_pattern=r"(^|/)kernel$", grad_clip_norm=1.0))
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=100, decay="cosine", end_factor=0.01))
  config.label_smoothing = 0.1
  # Off by default: mixup/cutmix, or MixPro (mixpro_alpha > 0; mixpro_cell pixels per
  # mask cell, a multiple of the patch size, 0: the patch size). See vit_jax/finetune.py.
  config.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0,
                                                switch_prob=0.5, mixpro_alpha=0.0,
                                                mixpro_cell=0))
  config.total_steps = 1500
  config.num_epochs = config_dict.placeholder(float)  # alternative to total_steps
  config.grad_accum_steps = 1

  # Device mesh (-1: the remaining devices) and how the train state is laid out on
  # it: rules map the parameters' logical axes to mesh axes ("tensor", "fsdp,tensor"
  # or "none"; e.g. --config.sharding.rules.heads=none); FSDP shards every array of
  # at least fsdp_min_size elements over "fsdp" (see vit_jax/sharding.py, README).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict(dict(
      rules=dict(embed="none", heads="tensor", head_dim="none", mlp="tensor",
                 layers="none"),
      fsdp_min_size=2**14))
  # Quantization-aware training through qwix (mode "int8" | "int4" | "w4a8" | "fp8";
  # "" trains in float; see vit_jax/quantization.py) and pruning during training
  # (n:m, e.g. 2:4, or a global magnitude sparsity; see vit_jax/sparsity.py).
  config.quantization = ml_collections.ConfigDict(dict(mode="", targets=".*", exclude=""))
  config.sparsity = ml_collections.ConfigDict(dict(
      n=0, m=0, sparsity=0.0, targets=r"^Transformer/.*kernel$", start_step=0,
      update_every=100))
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  # TensorBoard: input grid at step 0; attention maps (plain ViTs) and parameter-norm
  # histograms at each eval; hparams (vit_jax/trainers/pictures.py).
  config.tensorboard_pictures = True
  # > 0: a JAX profiler trace of that many steps after the first (compiling) one, in
  # the TensorBoard directory (Profile tab; needs tensorboard-plugin-profile to view).
  config.profile_steps = 0
  # Weights & Biases beside TensorBoard: on when project is set (`pip install wandb`;
  # vit_jax/trainers/wandb_writer.py).
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))
  if arg.startswith("mixpro"):  # the MixPro comparison: 500 steps, with and without
    config.total_steps = 500
  if arg == "mixpro":
    config.mixup.update(mixpro_alpha=1.0, mixpro_cell=8)
  return config
