r"""Repeated ``kill -9``: a training run killed at random moments ends bit-identical.

  PYTHONPATH=$PWD python tests/kill_resume.py --trainer=digits --kills=10
  PYTHONPATH=$PWD python tests/kill_resume.py --trainer=clip --kills=10
  PYTHONPATH=$PWD python tests/kill_resume.py --trainer=mae --kills=10
  PYTHONPATH=$PWD python tests/kill_resume.py --trainer=early_exit --kills=10
  PYTHONPATH=$PWD python tests/kill_resume.py --trainer=digits --kills=10 \
      --config=configs/digits_moe.py:top2 --override=--config.model.moe.layers=1

``--config`` runs another config file of the trainer's family with its tiny settings
(``--override`` adds or replaces flags, e.g. to fit MoE layers into its 2 blocks).
``early_exit`` first trains a tiny digits ViT (20 steps, not killed), then kills
``python -m vit_jax.tools.early_exit`` on it: LGViT's stage 1 (20 steps, backbone and
exits) and stage 2 (the exits); the final compare is stage 2's state, which depends on
stage 1's result.

Runs one uninterrupted reference run, then reruns the same command in a fresh workdir
and SIGKILLs it ``--kills`` times, each at a random moment after the train step
compiled (checkpoints are written every step, so about half the kills land while a
save is in flight), rerunning after each kill; the run that finishes must hold final
parameters and optimizer state bit-identical to the reference. Too slow for the test
suite (a few minutes); tests/test_train.py and tests/test_contrastive_train.py kill
each trainer once or twice. Prints one line per kill and a summary; exits 1 on any
difference.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TRAINERS = {
    "digits": ("configs/digits_vit.py", [
        "--config.model.hidden_size=32", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.input.batch_size=32", "--config.schedule.warmup_steps=5",
        "--config.log_every=5", "--config.eval_every=0", "--config.checkpoint_every=1",
        "--config.keep_checkpoints=3"]),
    "clip": ("configs/clip_digits.py", [
        "--config.input.batch_size=16", "--config.input.shards_per_window=2",
        "--config.input.threads=1", "--config.model.image.hidden_size=32",
        "--config.model.image.num_layers=1", "--config.model.image.num_heads=2",
        "--config.model.image.mlp_dim=64", "--config.model.text.hidden_size=32",
        "--config.model.text.num_layers=1", "--config.model.text.num_heads=2",
        "--config.model.text.mlp_dim=64", "--config.model.embed_dim=32",
        "--config.schedule.warmup_steps=2", "--config.log_every=5",
        "--config.eval_every=0", "--config.checkpoint_every=1",
        "--config.keep_checkpoints=3"]),
    "mae": ("configs/digits_mae.py", [
        "--config.model.hidden_size=32", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.mae.decoder_width=32", "--config.mae.decoder_depth=1",
        "--config.mae.decoder_heads=2", "--config.mae.decoder_mlp_dim=64",
        "--config.input.batch_size=32", "--config.schedule.warmup_steps=5",
        "--config.log_every=5", "--config.eval_every=0", "--config.checkpoint_every=1",
        "--config.keep_checkpoints=3"]),
    # Exit heads on a 3-block digits ViT (run_backbone trains it first).
    "early_exit": ("configs/digits_early_exit.py", [
        "--config.exit_layers=(0,1)", "--config.exit_heads=('local','global')",
        "--config.exit_weights=(1.0,1.0)", "--config.stage1_steps=20",
        "--config.batch_size=32",
        "--config.checkpoint_every=1", "--config.keep_checkpoints=3",
        "--config.thresholds=(0.5,1.01)"]),
}
# Where each trainer writes its checkpoints and results.json, under the workdir.
OUTPUT = {"early_exit": "early_exit"}


def command(trainer, workdir, steps, data, config=None, extra=()):
  default, overrides = TRAINERS[trainer]
  config = config or default
  if trainer == "early_exit":  # workdir: the tool's output_dir, beside the backbone
    return [sys.executable, "-m", "vit_jax.tools.early_exit",
            f"--config={os.path.join(REPO, config)}",
            f"--workdir={os.path.join(os.path.dirname(workdir), 'backbone')}",
            f"--config.output_dir={workdir}", f"--config.steps={steps}",
            f"--config.data_dir={data}", *overrides, *extra]
  data_flag = (f"--config.input.data_dir={data}" if trainer in ("digits", "mae")
               else f"--config.input.pool={data}")
  return [sys.executable, "-m", "vit_jax.main", f"--config={os.path.join(REPO, config)}",
          f"--workdir={workdir}", f"--config.total_steps={steps}", data_flag, *overrides,
          *extra]


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def final_state(workdir, steps):
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, tree  # pylint: disable=g-import-not-at-top
  state = checkpoint.load_state_arrays(os.path.join(workdir, "checkpoints", str(steps)))
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": state["params"], "opt_state": state["opt_state"]})[0]
  return {tree.path_name(path): np.asarray(leaf) for path, leaf in leaves}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trainer", choices=sorted(TRAINERS), default="digits")
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_delay", type=float, default=3.0,
                      help="kill within this many seconds after the first step")
  parser.add_argument("--config", default=None,
                      help="config file (relative to the repository) in place of the "
                           "trainer's, e.g. configs/digits_moe.py:top2")
  parser.add_argument("--override", action="append", default=[],
                      help="extra --config.* flag, repeatable; later flags win")
  args = parser.parse_args()
  run = lambda workdir: command(args.trainer, workdir, args.steps, data, args.config,
                                args.override)
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix=f"kill_resume_{args.trainer}_")
  data = os.path.join(root, "data")
  if args.trainer in ("digits", "mae", "early_exit"):
    from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    input_pipeline.get_builder("digits", data_dir=data)
  else:
    from vit_jax.tools import make_pool  # pylint: disable=g-import-not-at-top
    make_pool.make_pool(data, num_samples=120, samples_per_shard=24, eval_renders=1)
  if args.trainer == "early_exit":  # the frozen backbone the exit heads train on
    subprocess.run(command("digits", os.path.join(root, "backbone"), 20, data, extra=[
        "--config.model.num_layers=3", "--config.checkpoint_every=20"]),
        env=env(), check=True, capture_output=True)
  subdir = OUTPUT.get(args.trainer, "")
  reference = os.path.join(root, "reference")
  subprocess.run(run(reference), env=env(),
                 check=True, capture_output=True)
  workdir = os.path.join(root, "killed")
  kills = mid_save = runs = 0
  while True:
    runs += 1
    proc = subprocess.Popen(run(workdir), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kills < args.kills:
      for line in proc.stdout:
        if line.startswith(("step ", "exit heads stage ")):  # compiled and running
          break
      time.sleep(rng.uniform(0, args.max_delay))
      ckpt_dir = os.path.join(workdir, subdir, "checkpoints")
      # (None yet while the exit tool is in its stage 1, under early_exit/stage1.)
      listing = lambda: os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
      in_flight = any("tmp" in e for e in listing())
      proc.kill()
      proc.wait()
      if proc.returncode == -9:
        kills += 1
        mid_save += in_flight
        done = sorted(int(e) for e in listing() if e.isdigit())
        print(f"kill {kills}: committed steps {done}, save in flight: {in_flight}",
              flush=True)
        continue
      print(f"run {runs} finished before its kill (exit {proc.returncode}); "
            f"use more --steps for {args.kills} kills", flush=True)
      break
    else:
      output = proc.stdout.read()
      proc.wait()
      if proc.returncode:
        print(output[-3000:])
        sys.exit(f"the rerun failed ({proc.returncode})")
      if os.path.exists(os.path.join(workdir, subdir, "results.json")):
        break
  a = final_state(os.path.join(workdir, subdir), args.steps)
  b = final_state(os.path.join(reference, subdir), args.steps)
  differ = [k for k in b if k not in a or not np.array_equal(a[k], b[k])]
  print(f"{args.trainer}: {kills} kills ({mid_save} with a save in flight), {runs} runs; "
        f"final params and optimizer state: {len(b) - len(differ)} of {len(b)} arrays "
        f"bit-identical to the uninterrupted run")
  sys.exit(1 if differ or len(a) != len(b) else 0)


if __name__ == "__main__":
  main()
