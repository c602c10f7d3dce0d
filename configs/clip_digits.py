r"""A small CLIP on the offline digits pool: the whole contrastive loop on a CPU.

  python -m vit_jax.tools.make_pool --output_dir=workdirs/digits_pool
  python -m vit_jax.main --config=configs/clip_digits.py --workdir=workdirs/clip_digits

Measured (README, "Contrastive pretraining"; 2-core CPU, ~850 pairs/s when alone):
zero-shot top-1 92.7% (top-5 99.7%) on the 1,080 held-out renderings of the 360
held-out digits after 4,000 steps, with prompt templates that no training caption
uses. That run's tokenizer had other token ids than the one ``make_pool`` trains
(README, "Determinism"): a rerun is a draw from the seed spread (84.0-86.1% at 3,000
steps over two seeds). ``:siglip`` trains with the sigmoid loss instead.
``--config.quantization.mode=int8`` trains with QAT (docs/quantization.md, where the
PTQ of this model's step-2,000 checkpoint is measured: 74.72% float, 74.63% int8).
``--config.input.pool=DIR`` points at another pool (e.g. a noisy or a filtered one:
see the README's filtering experiment). On a pool with 40% mismatched captions
learning starts slowly: train the scorer with ``--config.total_steps=9000`` (79.7%
zero-shot; 3,000 steps give 19.8%).
``:naflex`` (or ``siglip,naflex``) feeds the image tower NaFlex patches (the
``naflex(4, 16)`` pp op, a MAP head): 29.35% zero-shot at
``--config.total_steps=1500`` vs 51.57% for the default at 1,500 steps (README).
"""

import math

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  # Variants: a loss ("clip" or "siglip") and/or "naflex", joined by commas.
  parts = [p for p in (arg or "clip").split(",") if p]
  losses = [p for p in parts if p in ("clip", "siglip")]
  unknown = [p for p in parts if p not in ("clip", "siglip", "naflex")]
  if unknown or len(losses) > 1:
    raise ValueError(f"configs/clip_digits.py takes 'clip' or 'siglip' and/or 'naflex' "
                     f"(comma-separated, e.g. 'siglip,naflex'), got {arg!r}")
  loss = losses[0] if losses else "clip"
  config = ml_collections.ConfigDict()
  config.trainer = "contrastive"
  config.seed = 0
  config.loss = loss
  config.siglip_chunk_size = config_dict.placeholder(int)  # per-device rows per chunk

  config.input = ml_collections.ConfigDict()
  # The pool directory (make_pool's output); the shard and tokenizer paths follow it
  # unless overridden one by one.
  config.input.pool = "workdirs/digits_pool"
  pool = config.input.get_ref("pool")
  config.input.train_shards = pool + "/train"
  config.input.batch_size = 128
  config.input.eval_batch_size = 360
  config.input.shards_per_window = 8
  # At most this many bytes of a window in memory, twice (see clip_datacomp.py); the
  # digits pool's shards fit whole.
  config.input.window_bytes = 64 << 20
  # tf.data threads (decoding, augmentation, tokenizing); None: one per core.
  config.input.threads = config_dict.placeholder(int)
  config.input.record_keys = False  # write the keys of every step's samples
  # Small shifts and crops; no flips (they would turn digits into other shapes).
  config.input.pp_train = "decode|resize(16)|random_crop(16, pad=1)|value_range(-1, 1)"
  config.input.pp_eval = "decode|resize(16)|value_range(-1, 1)"

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.path = pool + "/tokenizer.json"
  config.tokenizer.context_length = 24  # captions take <= 15 tokens, prompts <= 21

  # The ViT-B/32 CLIP layout, shrunk to CPU size: a 4-layer ViT on the scenes resized
  # to 16x16 (16 patches of 4x4; the digits are 8x8 scans, so nothing is lost) and a
  # 2-layer causal text transformer, both 64 wide.
  config.model_name = "clip_vit_base_patch32_224"
  config.model = ml_collections.ConfigDict(dict(
      image_model="vit_tiny_patch16_224",
      image=dict(image_size=16, patch_size=4, hidden_size=64, num_layers=4, num_heads=4,
                 mlp_dim=256),
      text=dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256),
      embed_dim=64))
  if "naflex" in parts:
    # NaFlex (SigLIP 2): the 32x32 scenes resized near their aspect ratio to at most
    # 16 patches of 4x4 (here 4x4 patches: the same 16 tokens as above), fed as
    # patches with positions; the ViT pools with a MAP head over each image's tokens.
    config.input.pp_train = ("decode|random_crop(32, pad=2)|value_range(-1, 1)|"
                             "naflex(4, 16)")
    config.input.pp_eval = "decode|value_range(-1, 1)|naflex(4, 16)"
    config.model.naflex = True
    config.model.image.classifier = "map"
  if loss == "siglip":
    config.model.logit_scale_init = math.log(10.0)
    config.model.logit_bias_init = -10.0
  config.max_logit_scale = 100.0
  # Quantization-aware training (mode "int8", "int4", "w4a8" or "fp8"; "" trains in
  # float): both towers, or the modules `targets` matches ("img/.*": the image tower).
  config.quantization = ml_collections.ConfigDict(dict(mode="", targets=".*", exclude=""))

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
      wd_pattern=r"(^|/)kernel$", grad_clip_norm=1.0))
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=100, decay="cosine", end_factor=0.0))
  config.total_steps = 4000
  config.total_samples = config_dict.placeholder(int)  # alternative to total_steps

  eval_shards = pool + "/eval"
  config.evals = ml_collections.ConfigDict()
  config.evals.zero_shot = ml_collections.ConfigDict()
  config.evals.zero_shot.digits = ml_collections.ConfigDict(dict(
      shards=eval_shards, label_key="label", classnames="digits",
      templates="digits_heldout", pp=config.input.get_ref("pp_eval"), cache=True))
  config.evals.retrieval = ml_collections.ConfigDict()
  config.evals.retrieval.digits = ml_collections.ConfigDict(dict(
      shards=eval_shards, pp=config.input.get_ref("pp_eval"), cache=True))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Train-state layout: logical axes -> mesh axes (as in configs/digits_vit.py).
  config.sharding = ml_collections.ConfigDict(dict(
      rules=dict(embed="none", heads="tensor", head_dim="none", mlp="tensor",
                 layers="none"),
      fsdp_min_size=2**14))
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 2
  # Weights & Biases beside TensorBoard: on when project is set (`pip install wandb`;
  # vit_jax/trainers/wandb_writer.py).
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))
  return config
