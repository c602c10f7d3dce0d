r"""CLIP (or SigLIP) on image-text shards with DataComp's fixed hyperparameters per scale.

  python -m vit_jax.main --config=configs/clip_datacomp.py:small --workdir=workdirs/dc_small \
      --config.input.train_shards='/data/datacomp/small/shards/{00000000..00001287}.tar' \
      --config.tokenizer.path=/data/clip_tokenizer.json \
      --config.evals.zero_shot.imagenet.classnames=/data/imagenet_classnames.txt \
      --config.evals.zero_shot.imagenet.templates=/data/imagenet_templates.txt

ARG is ``small``, ``medium``, ``large`` or ``xlarge`` (DataComp's ``scale_configs.py``),
optionally followed by ``,siglip`` for the sigmoid loss (with SigLIP's temperature and
bias initialisation) instead of InfoNCE:

  scale   model     samples seen  batch   lr     warmup  beta2  steps
  small   ViT-B/32  12.8M         4,096   5e-4   500     0.98   3,125
  medium  ViT-B/32  128M          4,096   5e-4   500     0.98   31,250
  large   ViT-B/16  1.28B         8,192   5e-4   500     0.98   156,250
  xlarge  ViT-L/14  12.8B         90,112  1e-3   10,000  0.95   142,046

Everything else follows open_clip's defaults, which DataComp trains with: AdamW
(beta1 0.9, eps 1e-6, weight decay 0.2 on weights and embeddings, not on biases, norms
or the temperature), cosine decay to 0, no gradient clipping, mixed precision (here
bfloat16 compute, float32 parameters), RandomResizedCrop(224, scale 0.9-1) and
OpenAI's CLIP normalisation; the 77-token context of OpenAI's BPE tokenizer (give its
``tokenizer.json``, or train one with ``python -m vit_jax.tools.train_tokenizer``).

Expected (not run here: no such data or hardware): DataComp's baselines reach 3.9 /
29.7 / 63.1 / 79.2 % zero-shot ImageNet top-1 at small / medium / large / xlarge, and
CLIP-score filtering (``python -m vit_jax.tools.filter_pool``) beats no filtering at
every scale. Zero-shot ImageNet needs the TFDS ``imagenet2012`` validation split
(prepared with its manual download) and class-name and template files (one per line);
it is skipped with a message until ``classnames`` is set. Retrieval runs when
``evals.retrieval.heldout.shards`` points at held-out image-text shards.

The batch is global and split over the mesh's data axes (``mesh.data=-1``: all
devices); the loss sees the whole batch (gathered for InfoNCE, a ring for SigLIP).
"""

import math

import ml_collections
from ml_collections import config_dict

# DataComp's scale_configs.py.
SCALES = {
    "small": dict(model="clip_vit_base_patch32_224", samples=12_800_000, batch=4096,
                  lr=5e-4, warmup=500, beta2=0.98),
    "medium": dict(model="clip_vit_base_patch32_224", samples=128_000_000, batch=4096,
                   lr=5e-4, warmup=500, beta2=0.98),
    "large": dict(model="clip_vit_base_patch16_224", samples=1_280_000_000, batch=8192,
                  lr=5e-4, warmup=500, beta2=0.98),
    "xlarge": dict(model="clip_vit_large_patch14_224", samples=12_800_000_000,
                   batch=90_112, lr=1e-3, warmup=10_000, beta2=0.95),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg="small"):
  scale, _, loss = (arg or "small").partition(",")
  loss = loss or "clip"
  if scale not in SCALES:
    raise ValueError(f"unknown DataComp scale {scale!r}; use one of {', '.join(SCALES)}")
  if loss not in ("clip", "siglip"):
    raise ValueError(f"unknown loss {loss!r}; use 'clip' or 'siglip'")
  hp = SCALES[scale]
  config = ml_collections.ConfigDict()
  config.trainer = "contrastive"
  config.seed = 0
  config.loss = loss
  config.siglip_chunk_size = config_dict.placeholder(int)

  normalize = f"normalize(mean={CLIP_MEAN}, std={CLIP_STD})"
  config.input = ml_collections.ConfigDict()
  config.input.train_shards = config_dict.placeholder(str)  # required
  config.input.batch_size = hp["batch"]
  config.input.eval_batch_size = 1024
  # Each window of 8 shards is shuffled in parts of at most window_bytes of encoded
  # samples, an equal share from each shard (a part of 1 GB shards of ~10k samples:
  # ~128 MB and ~1.2k samples of each). Memory: 2 parts (one read ahead), whatever the
  # shards' size; None reads whole shards (2 windows of them in memory).
  config.input.shards_per_window = 8
  config.input.window_bytes = 1 << 30
  # tf.data threads (decoding, augmentation, tokenizing); None: one per core.
  config.input.threads = config_dict.placeholder(int)
  config.input.record_keys = False
  config.input.pp_train = f"decode|random_resized_crop(224, scale=(0.9, 1.0))|{normalize}"
  config.input.pp_eval = (f"decode|resize_small(224, method='bicubic')|central_crop(224)|"
                          f"{normalize}")

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.path = config_dict.placeholder(str)  # required: a tokenizer.json
  config.tokenizer.context_length = 77

  config.model_name = hp["model"]
  config.model = ml_collections.ConfigDict(dict(dtype="bfloat16"))
  if loss == "siglip":
    config.model.logit_scale_init = math.log(10.0)
    config.model.logit_bias_init = -10.0
  config.max_logit_scale = 100.0

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=hp["lr"], b1=0.9, b2=hp["beta2"], eps=1e-6,
      weight_decay=0.2, wd_pattern=r"(^|/)(kernel|embedding|pos_embedding)$",
      grad_clip_norm=0.0))
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=hp["warmup"], decay="cosine", end_factor=0.0))
  config.total_samples = hp["samples"]
  config.total_steps = config_dict.placeholder(int)  # derived from total_samples

  config.evals = ml_collections.ConfigDict()
  config.evals.zero_shot = ml_collections.ConfigDict()
  config.evals.zero_shot.imagenet = ml_collections.ConfigDict(dict(
      dataset="imagenet2012", split="validation", data_dir=config_dict.placeholder(str),
      classnames=config_dict.placeholder(str), templates=config_dict.placeholder(str),
      pp=config.input.get_ref("pp_eval"), cache=False))
  config.evals.retrieval = ml_collections.ConfigDict()
  config.evals.retrieval.heldout = ml_collections.ConfigDict(dict(
      shards=config_dict.placeholder(str), pp=config.input.get_ref("pp_eval"),
      cache=False))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Train-state layout: logical axes -> mesh axes (as in configs/digits_vit.py).
  config.sharding = ml_collections.ConfigDict(dict(
      rules=dict(embed="none", heads="tensor", head_dim="none", mlp="tensor",
                 layers="none"),
      fsdp_min_size=2**14))
  steps = math.ceil(hp["samples"] / hp["batch"])
  config.log_every = 100
  config.eval_every = max(steps // 8, 100)
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  # Weights & Biases beside TensorBoard: on when project is set (`pip install wandb`;
  # vit_jax/trainers/wandb_writer.py).
  config.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))
  return config
