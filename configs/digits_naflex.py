r"""Mixed-resolution digits through the classification trainer: NaViT packing vs padding.

  python -m vit_jax.main --config=configs/digits_naflex.py --workdir=workdirs/naflex_packed
  python -m vit_jax.main --config=configs/digits_naflex.py:padded \
      --workdir=workdirs/naflex_padded
  python -m vit_jax.main --config=configs/digits_naflex.py:fixed --workdir=workdirs/naflex_fixed

Every training digit is drawn at a random size (``random_size(16, 48, 8)``: sides 16
to 48 pixels in steps of the patch size 8, aspect ratios 1:2 to 2:1, 4 to 36 patches)
and patchified at that size (``naflex(8, 36, upsample=False)``); the model is the
digits ViT (dim 64, depth 4, ``gap``, 4x4 stored position table) as NaFlex
(``model.naflex``). The default packs the images NaViT-style (``input.packing``: 20
packs of 64 tokens per step, up to 8 images each, about 64 images); ``:padded`` gives
every image its own sequence of 36 tokens (the largest size), 64 per step; ``:fixed``
is the baseline: the plain ViT on the digits resized to 32x32; ``:dropped`` packs
with NaViT's token dropping in training (``drop_tokens(0.0, max_rate=0.5)``: each
image keeps a random 50-100% of its patches, so more images fit a pack). The test digits are
drawn at mixed sizes too (from a hash of each image: the same sizes for every run);
``:fixed`` tests at 32x32. The other test resolution of a finished run is a rerun on
its workdir with only the eval pp changed (it evaluates the last checkpoint):

  python -m vit_jax.main --config=configs/digits_naflex.py --workdir=workdirs/naflex_packed \
      --config.input.pp_eval="decode|resize(32)|value_range(-1, 1)|naflex(8, 36, upsample=False)"
  python -m vit_jax.main --config=configs/digits_naflex.py:padded \
      --workdir=workdirs/naflex_fixed  # the fixed ViT's parameters as NaFlex, mixed sizes

Measured (README, "Flexible and native resolution"; 2-core CPU at load 25-40, one run
each, 360 test digits, mixed sizes / 32x32): packed 91.94% / 93.33%, padded 93.89% /
95.83%, fixed 45.00% / 97.22%. Packed vs padded throughput while both ran: 53.5 vs
33.3 and 85.5 vs 58.0 images/s (1.61x, 1.47x), 1,280 vs 2,304 tokens per step.
"""

from vit_jax import config_files

VARIANTS = ("", "packed", "padded", "fixed", "dropped")
MIXED = "decode|random_size(16, 48, 8, 2.0)|value_range(-1, 1)|naflex(8, 36, upsample=False)"


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"configs/digits_naflex.py takes one of {VARIANTS}, got {arg!r}")
  config = config_files.sibling_config(__file__, "digits_vit.py")
  config.model.update(image_size=32, patch_size=8, classifier="gap", mlp_dim=256)
  config.model.naflex = arg != "fixed"
  config.input.pp_train = MIXED
  config.input.pp_eval = MIXED
  # NaViT packing: seq_len tokens per pack, images_per_pack slots (an empty slot is
  # padding, label -1); input.batch_size counts packs. seq_len=0: no packing.
  config.input.packing = dict(seq_len=64, images_per_pack=8)
  config.input.batch_size = 20
  config.total_steps = 700
  config.eval_every = 700
  config.checkpoint_every = 350
  if arg in ("padded", "fixed"):
    config.input.batch_size = 64
  if arg == "padded":  # one image per sequence, padded to the largest (36 patches)
    config.input.packing = dict(seq_len=36, images_per_pack=1)
  if arg == "dropped":  # NaViT's continuous token dropping: 0-50% of each image's patches
    config.input.pp_train = MIXED + "|drop_tokens(0.0, max_rate=0.5)"
  if arg == "fixed":
    config.input.packing = dict(seq_len=0, images_per_pack=0)
    config.input.pp_train = "decode|resize(32)|value_range(-1, 1)"
    config.input.pp_eval = "decode|resize(32)|value_range(-1, 1)"
  return config
