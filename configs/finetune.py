r"""Fine-tune a pretrained model on a dataset at a resolution: `<model>,<dataset>[,<res>]`.

  python -m vit_jax.main --config=configs/finetune.py:vit_base_patch16_224,cifar10,384 \
      --config.init=ViT-B_16.npz --workdir=workdirs/ft_cifar10

  # Offline: the digits demo checkpoint (`make demo`) at 24x24 on digits 0-4 only.
  python -m vit_jax.main --config=configs/finetune.py:digits_vit,digits,24 \
      --config.init=workdirs/digits_demo --config.input.classes=0,1,2,3,4 \
      --workdir=workdirs/ft_digits

`--config.init` takes a vision_transformer/big_vision `.npz`, a timm
`.safetensors`/`.pth`, a Hub repository (`hf-hub:timm/vit_base_patch16_224.augreg_in1k`,
downloaded into the Hub's cache), or a vit_jax workdir/checkpoint (see vit_jax/weights/): a
new head is made for the dataset's classes, the position embedding is resampled to
the new resolution, and anything else that does not fit stops the run with the key
names (`--config.init_allow_partial=True` loads what fits, knowingly).

`digits_vit` is the demo's small ViT (configs/digits_vit.py); any registered name
works. Expected: the digits fine-tune above reaches ≈97% on the held-out digits 0-4
after 300 steps, from ≈99% of the 16x16 demo (README, "Fine-tuning").

Controls, all off by default: `freeze` (regex of frozen parameters) or `train_only`,
`optimizer.layer_decay`, `ema_decay` (the EMA is evaluated), `mixup.mixup_alpha` /
`mixup.cutmix_alpha` or MixPro (`mixup.mixpro_alpha`, `mixup.mixpro_cell`),
RandAugment in `input.pp_train` (`randaug(2, 10)`), and
`lora.rank` (adapters on attention and MLP; only they and the head train).
"""

import ml_collections
from ml_collections import config_dict

DIGITS_VIT = dict(patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)


def get_config(arg: str = "digits_vit,digits,24"):
  parts = arg.split(",")
  if len(parts) not in (2, 3):
    raise ValueError(f"expected '<model>,<dataset>[,<resolution>]', got {arg!r}")
  model_name, dataset = parts[0], parts[1]
  digits = dataset == "digits"
  res = int(parts[2]) if len(parts) == 3 else (24 if digits else 224)

  config = ml_collections.ConfigDict()
  config.trainer = "classification"
  config.seed = 0

  config.init = config_dict.placeholder(str)  # the pretrained checkpoint
  config.init_reinit = r"^head/"  # re-initialised when absent or of another shape
  config.init_allow_partial = False

  config.input = ml_collections.ConfigDict()
  config.input.dataset = dataset
  config.input.data_dir = config_dict.placeholder(str)
  config.input.download = not digits
  config.input.train_split = "train"
  config.input.eval_split = "test"
  config.input.classes = ""  # e.g. "0,1,2,3,4": a class subset, relabelled 0..n-1
  config.input.batch_size = 128 if digits else 512
  config.input.eval_batch_size = 360 if digits else 512
  config.input.shuffle_buffer = 2_000 if digits else 25_000
  config.input.cache = digits
  config.input.data_shards = config_dict.placeholder(int)
  if digits:
    config.input.pp_train = (f"decode|resize({res})|random_crop({res}, pad={res // 8})|"
                             "value_range(-1, 1)")
    config.input.pp_eval = f"decode|resize({res})|value_range(-1, 1)"
  else:  # vision_transformer's fine-tuning preprocessing
    config.input.pp_train = (f"decode|random_resized_crop({res}, scale=(0.05, 1.0))|"
                             "flip_lr|value_range(-1, 1)")
    config.input.pp_eval = f"decode|resize({res})|value_range(-1, 1)"

  if model_name == "digits_vit":
    config.model_name = "vit_tiny_patch16_224"
    config.model = ml_collections.ConfigDict(dict(DIGITS_VIT, image_size=res,
                                                  drop_path_rate=0.0))
  else:
    config.model_name = model_name
    config.model = ml_collections.ConfigDict(dict(image_size=res))

  # vision_transformer's recipe: SGD with momentum, cosine, no weight decay.
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.03, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, wd_pattern=r"(^|/)kernel$", grad_clip_norm=1.0,
      layer_decay=config_dict.placeholder(float)))
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=30 if digits else 500, decay="cosine", end_factor=0.0))
  config.label_smoothing = 0.0
  config.total_steps = 300 if digits else 10_000
  config.num_epochs = config_dict.placeholder(float)
  config.grad_accum_steps = 1

  config.freeze = config_dict.placeholder(str)  # e.g. "^(embedding|cls|Transformer)(/|$)"
  config.train_only = config_dict.placeholder(str)
  config.ema_decay = config_dict.placeholder(float)  # e.g. 0.999
  # mixpro_alpha > 0: MixPro instead of mixup/cutmix (grid cells of mixpro_cell
  # pixels, 0: the patch size; labels from the class token's attention).
  config.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0,
                                                switch_prob=0.5, mixpro_alpha=0.0,
                                                mixpro_cell=0))
  config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=""))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict(dict(
      rules=dict(embed="none", heads="tensor", head_dim="none", mlp="tensor",
                 layers="none"),
      fsdp_min_size=2**14))
  config.log_every = 50 if digits else 100
  config.eval_every = 0 if digits else 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 1
  # TensorBoard: input grid at step 0; attention maps (plain ViTs) and parameter-norm
  # histograms at each eval; hparams (vit_jax/trainers/pictures.py).
  config.tensorboard_pictures = True
  # > 0: a JAX profiler trace of that many steps after the first (compiling) one, in
  # the TensorBoard directory (Profile tab; needs tensorboard-plugin-profile to view).
  config.profile_steps = 0
  # Weights & Biases beside TensorBoard: on when project is set (`pip install wandb`;
  # vit_jax/trainers/wandb_writer.py).
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))
  return config
