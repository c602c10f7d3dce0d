r"""The linear-time backbones (ViG, ViG-H, RMT, Vim, ViR) trained on the digits, tiny widths.

  python -m vit_jax.main --config=configs/digits_linear.py:vig --workdir=workdirs/digits_vig
  python -m vit_jax.main --config=configs/digits_linear.py:vig_h --workdir=workdirs/digits_vig_h
  python -m vit_jax.main --config=configs/digits_linear.py:rmt --workdir=workdirs/digits_rmt
  python -m vit_jax.main --config=configs/digits_linear.py:vim --workdir=workdirs/digits_vim
  python -m vit_jax.main --config=configs/digits_linear.py:vir --workdir=workdirs/digits_vir

Each is its family's registered tiny model shrunk to width 64, two blocks (RMT, ViG-H:
two stages of one block), 4x4 patches of the 16x16 digits, trained 300 steps at batch 64
(Vim: 16) with the demo's optimizer (AdamW 3e-3, warmup 30, cosine) and evaluated once at the end.
The tests (`tests/test_linear_time_models.py`, `tests/test_rmt.py`: `-k trains`) run
one-block versions for 30-60 steps; this is the longer run.

Measured (2026-12-07, shared 2-core CPU at load 20-40, seed 0, one run each; README,
"Linear-time backbones"): test top-1 on the 360 held-out digits ViG 99.72%, RMT
99.17%, Vim 91.39%, ViR 84.17%; train loss (label smoothing 0.1) from 2.1-2.4 at
step 25 to 0.53 / 0.55 / 0.83 / 0.91 at step 300. 10-16 minutes each. ViG-H (two
stages of one block, widths 32 and 64; measured later, load ~10): 98.89%, train loss
2.03 -> 0.55, 4 minutes.
"""

from vit_jax import config_files

FAMILIES = {
    "vig": ("vig_tiny", dict(embed_dim=64, depth=2, num_heads=2, patch_size=4,
                             image_size=16)),
    # ViG-H: its stride-4 stem (16x16 -> 4x4 tokens), two stages of one block.
    "vig_h": ("vig_h_tiny", dict(embed_dims=(32, 64), depths=(1, 1), num_heads=(2, 2))),
    "vim": ("vim_tiny_patch16_224", dict(embed_dim=64, depth=2, patch_size=4,
                                         image_size=16)),
    # layer_scale 1: from ViR's 1e-5 the blocks barely move in a few hundred steps.
    "vir": ("vir_small_patch16_224", dict(embed_dim=64, depth=2, num_heads=2,
                                          patch_size=4, image_size=16, layer_scale=1.0)),
    # A 4x4-stride stem (16x16 -> 4x4 tokens), then one decomposed and one full
    # Manhattan-attention stage.
    "rmt": ("rmt_tiny", dict(embed_dims=(32, 64), depths=(1, 1), num_heads=(2, 2),
                             mlp_ratios=(3, 3), initial_values=(2, 2), heads_ranges=(4, 4),
                             decomposed=(True, False), layer_scales=(False, False),
                             projection=128)),
}


def get_config(arg=None):
  if arg not in FAMILIES:
    raise ValueError(f"configs/digits_linear.py takes one of {tuple(FAMILIES)}, "
                     f"got {arg!r}")
  config = config_files.sibling_config(__file__, "digits_vit.py")
  name, settings = FAMILIES[arg]
  config.model_name = name
  config.model = settings
  # Vim's selective scan (a head per channel, dk = d_state = 16, dv = 1) runs ~15x
  # slower per image on CPU than the others: a quarter of the batch.
  config.input.batch_size = 16 if arg == "vim" else 64
  config.total_steps = 300
  config.schedule.warmup_steps = 30
  config.log_every = 25
  config.eval_every = config.checkpoint_every = 300
  config.tensorboard_pictures = False  # attention maps are drawn for plain ViTs only
  return config
