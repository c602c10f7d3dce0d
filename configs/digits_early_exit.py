r"""Early exits (LGViT's heads and two-stage recipe) on the digits ViT of `configs/digits_mae.py`.

  python -m vit_jax.main --config=configs/digits_mae.py --workdir=workdirs/digits_mae
  python -m vit_jax.main --config=configs/finetune.py:digits_vit,digits,16 \
      --config.init=workdirs/digits_mae --workdir=workdirs/ft_mae
  python -m vit_jax.tools.early_exit --config=configs/digits_early_exit.py \
      --workdir=workdirs/ft_mae
  python -m vit_jax.tools.early_exit --config=configs/digits_early_exit.py:plain \
      --workdir=workdirs/ft_mae --config.output_dir=workdirs/ee_plain  # the baseline

The third command puts exits after blocks 0, 1 and 2 of the fine-tuned 4-block ViT
(LGViT's local-perception heads on the first two, a global-aggregation head on the
third), trains backbone and exits end to end for 150 steps (stage 1), then the exits
alone for 150 steps by self-distillation from the final head, the backbone frozen
(stage 2), and prints top-1 and mean GFLOPs per image at each confidence threshold
(README, "Early exits"). Measured (2-core CPU, seed 0, 360 test digits; README has the
tables, made with these settings): the fine-tuned ViT gets 93.33%; at threshold 0.5
the exits keep 92.78% for 66% fewer GFLOPs than the ViT (0.55 points), at 0.72 95.00%
for 57% fewer; each exit alone: 92.50%, 91.94%, 93.33% (final head after stage 1:
93.61%). The fourth (plain heads, stage 2 only, 300 steps: the same step count) keeps
92.50% at 0.72 for 33% fewer; each exit alone: 58.89%, 83.61%, 91.11%.

Each stage's train state is checkpointed every ``checkpoint_every`` steps under
``<workdir>/early_exit/stage1`` and ``<workdir>/early_exit`` (or under
``<output_dir>/early_exit``); rerunning a command after a kill resumes there, input
stream included, and ends bit-identical to an uninterrupted run
(``tests/kill_resume.py --trainer=early_exit --steps=30``: 3 kills in stage 1, stage
2's final state 95 of 95 arrays bit-identical).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  """``arg``: "lgvit" (default: LGViT's heads and both stages) or "plain" (plain heads,
  stage 2 only: the first recipe, the baseline of the README's comparison)."""
  arg = arg or "lgvit"
  if arg not in ("lgvit", "plain"):
    raise ValueError(f"configs/digits_early_exit.py:{arg}: use 'lgvit' or 'plain'")
  config = ml_collections.ConfigDict()
  config.exit_layers = (0, 1, 2)  # blocks (0-based) followed by an exit
  # One head per exit: "plain", "local" (LGViT's local perception: depthwise conv on
  # the token grid) or "global" (its global aggregation: attention pooling).
  config.exit_heads = (("plain",) * 3 if arg == "plain" else ("local", "local", "global"))
  # Stage 1: backbone and exits end to end (0 skips it); the loss weights the exits'
  # cross-entropies by exit_weights (one per exit) beside the final head's.
  config.stage1_steps = 0 if arg == "plain" else 150
  config.backbone_learning_rate = 1e-4  # stage 1's, for the backbone (Adam, cosine)
  config.exit_weights = (1.0, 1.0, 1.0)
  # Stage 2: the exits alone, self-distilled from the final head, the backbone frozen.
  config.steps = 300 if arg == "plain" else 150
  config.batch_size = 128
  config.learning_rate = 3e-3  # the exits' (Adam, cosine decay), in both stages
  # A threshold above 1 never exits early: the full model's row.
  config.thresholds = (0.5, 0.6, 0.7, 0.72, 0.74, 0.76, 0.78, 0.8, 0.9, 0.95, 0.99, 1.01)
  config.data_dir = config_dict.placeholder(str)  # default: the workdir's run's
  # Exit heads' checkpoints and results.json go to <output_dir>/early_exit (default: the
  # workdir's); a rerun of the same command resumes from the newest good one.
  config.output_dir = config_dict.placeholder(str)
  config.checkpoint_every = 100  # steps (0: at the end only)
  config.keep_checkpoints = 3
  config.seed = 0
  return config.lock()
