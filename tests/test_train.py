"""The classification trainer through the real entry point, as users run it.

Every run is ``python -m vit_jax.main --config=configs/digits_vit.py`` with a tiny model,
so these tests exercise flags, data, checkpoints and logging end to end: kill-and-resume
exactness, a kill during a checkpoint write, divergence, bad input. Runs that are killed,
or use virtual devices, and the reference run are subprocesses; the others run the same
module in this process (``run_main_in_process``), which spares each ~15-20 s of
interpreter and TensorFlow start-up on 2 cores.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import REPO, run_main, run_main_in_process, subprocess_env
from vit_jax import checkpoint

CONFIG = "configs/digits_vit.py"
TOTAL_STEPS = 80


def tiny(tfds_dir, *extra):
  return (f"--config.input.data_dir={tfds_dir}", "--config.model.hidden_size=32",
          "--config.model.num_layers=2", "--config.model.num_heads=2",
          "--config.model.mlp_dim=64", "--config.input.batch_size=32",
          f"--config.total_steps={TOTAL_STEPS}", "--config.schedule.warmup_steps=5",
          "--config.optimizer.learning_rate=0.005", "--config.label_smoothing=0",
          "--config.log_every=5", "--config.eval_every=40", "--config.checkpoint_every=20",
          # One compile less per run; tests/test_tensorboard_pictures.py checks them.
          "--config.tensorboard_pictures=False", *extra)


def final_params(workdir, step=TOTAL_STEPS):
  state = checkpoint.load_state_arrays(os.path.join(workdir, "checkpoints", str(step)))
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference_run(tfds_dir, tmp_path_factory):
  """One uninterrupted run that the resume tests must reproduce exactly."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run_main(CONFIG, workdir, *tiny(tfds_dir))
  return workdir, proc


def assert_same_run(workdir, reference):
  a, b = final_params(workdir), final_params(reference)
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  ra, rb = results(workdir), results(reference)
  assert ra == rb, (ra, rb)


def test_training_learns_logs_and_checkpoints(reference_run):
  workdir, proc = reference_run
  result = results(workdir)
  assert result["step"] == TOTAL_STEPS and result["eval_count"] == 360
  # 80 tiny steps: clearly above chance (0.1; 3 sigma on 360 images is 0.15).
  assert result["eval_top1"] > 0.15
  lines = proc.stdout.splitlines()
  progress = [l for l in lines if l.startswith("step ")]
  assert len(progress) == TOTAL_STEPS // 5
  assert "img/s" in progress[-1] and "loss" in progress[-1] and "ETA" in progress[1]
  first_loss = float(progress[0].split("loss ")[1].split(" ")[0])
  last_loss = float(progress[-1].split("loss ")[1].split(" ")[0])
  assert last_loss < first_loss - 0.1
  assert f"final digits:test top-1 accuracy: {100 * result['eval_top1']:.2f}%" in proc.stdout
  assert f"tensorboard --logdir {workdir}/tensorboard" in proc.stdout
  # keep_checkpoints=2 of the saves at 20, 40, 60, 80.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["60", "80"]
  # TensorBoard event files with the training and eval scalars.
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  tags = set(acc.Tags()["scalars"]) | set(acc.Tags().get("tensors", []))
  for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/accuracy",
              "train/images_per_sec", "eval/top1", "eval/top5", "eval/loss"):
    assert tag in tags, (tag, tags)


def start_main(workdir, *overrides):
  cmd = [sys.executable, "-m", "vit_jax.main", f"--config={CONFIG}",
         f"--workdir={workdir}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def largest_file(directory):
  paths = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(paths, key=os.path.getsize)


def flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 1]))


def test_sigkill_mid_run_then_resume_is_exact(reference_run, tfds_dir, tmp_path):
  reference, _ = reference_run
  workdir = str(tmp_path / "killed")
  proc = start_main(workdir, *tiny(tfds_dir))
  for line in proc.stdout:
    if line.startswith("step 50/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert str(TOTAL_STEPS) not in os.listdir(os.path.join(workdir, "checkpoints"))
  resumed = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir))
  # Steps take about a millisecond and saves are asynchronous, so the last committed
  # checkpoint at the kill may be step 20, 40 or 60.
  match = re.search(rf"resumed from {workdir}/checkpoints/(\d+) \(step (\d+)\)",
                    resumed.stdout)
  assert match and 0 < int(match.group(1)) < TOTAL_STEPS, resumed.stdout[-1500:]
  assert f"compiling the train step (first step {int(match.group(1)) + 1})" in resumed.stdout
  assert_same_run(workdir, reference)
  # A flipped byte in the newest checkpoint: the rerun sets it aside, resumes from the
  # step before and ends where the uninterrupted run did, bit for bit.
  flip_byte(largest_file(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))))
  again = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir))
  assert (f"checkpoint {workdir}/checkpoints/{TOTAL_STEPS} is corrupt: files changed "
          "since the save:") in again.stderr and "SHA-256 mismatch" in again.stderr
  assert f"resumed from {workdir}/checkpoints/60 (step 60)" in again.stdout
  assert f"{TOTAL_STEPS}.corrupt" in os.listdir(os.path.join(workdir, "checkpoints"))
  assert_same_run(workdir, reference)


def test_sigkill_during_a_checkpoint_write(reference_run, tfds_dir, tmp_path):
  """Kill while Orbax writes a step; the resume ignores the partial write."""
  reference, _ = reference_run
  landed_mid_write = 0
  for attempt in range(4):
    workdir = str(tmp_path / f"killed{attempt}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    proc = start_main(workdir, *tiny(tfds_dir, "--config.checkpoint_every=1",
                                     "--config.log_every=1000"))
    while proc.poll() is None:  # poll until a write is in flight after step 10
      entries = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
      done = [int(e) for e in entries if e.isdigit()]
      if any("tmp" in e for e in entries) and max(done, default=0) >= 10:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.0005)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = [e for e in os.listdir(ckpt_dir) if "tmp" in e]
    landed_mid_write += bool(partial)
    resumed = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir))
    assert "resumed from" in resumed.stdout
    assert_same_run(workdir, reference)
    if landed_mid_write:
      break
  assert landed_mid_write, "no kill landed while a checkpoint was being written"


def test_nan_loss_keeps_the_last_good_checkpoint_and_a_rerun_only_reports(
    reference_run, tfds_dir, tmp_path):
  reference, _ = reference_run
  workdir = str(tmp_path / "nan")
  shutil.copytree(reference, workdir)
  ckpt = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))
  digest = lambda: {os.path.relpath(os.path.join(d, f), ckpt): hashlib.sha256(
      open(os.path.join(d, f), "rb").read()).hexdigest()
      for d, _, fs in os.walk(ckpt) for f in fs}
  before = digest()
  # value_range over an empty input range divides by zero: NaN images from the first
  # step after the resume.
  proc = run_main_in_process(CONFIG, workdir, *tiny(
      tfds_dir, f"--config.total_steps={TOTAL_STEPS + 20}",
      "--config.input.pp_train=decode|resize(16)|value_range(-1, 1, 0, 0)"), check=False)
  assert proc.returncode == 1
  assert f"loss became NaN or infinite at step {TOTAL_STEPS + 1}" in proc.stderr
  assert f"last good checkpoint is kept intact: {ckpt}" in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["60", "80"]
  assert digest() == before
  # The kept checkpoint still resumes; on a finished run that only restores and reports.
  again = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir))
  assert f"resumed from {workdir}/checkpoints/{TOTAL_STEPS}" in again.stdout
  assert "compiling the train step" not in again.stdout
  after, expected = final_params(workdir), final_params(reference)
  assert sorted(after) == sorted(expected)
  for name in after:
    np.testing.assert_array_equal(after[name], expected[name], err_msg=name)


def test_mismatched_and_corrupt_checkpoints_are_clear_errors(tfds_dir, tmp_path):
  workdir = str(tmp_path / "ckpt")
  # A relative --workdir (as `make demo` passes) works like an absolute one.
  run_main_in_process(CONFIG, "ckpt", *tiny(tfds_dir, "--config.total_steps=10"),
                      cwd=str(tmp_path))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]
  config_json = open(os.path.join(workdir, "config.json"), "rb").read()
  proc = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir, "--config.total_steps=20",
                                                    "--config.model.hidden_size=48"),
                             check=False)
  assert proc.returncode == 1
  assert "does not fit this model" in proc.stderr
  assert "Transformer/encoder_norm/bias: expected (48,), found (32,)" in proc.stderr
  assert "use a new --workdir" in proc.stderr
  assert ("Settings changed since it was saved: model.hidden_size: 32 -> 48; "
          "total_steps: 10 -> 20") in proc.stderr
  # The workdir still describes the model it holds.
  assert open(os.path.join(workdir, "config.json"), "rb").read() == config_json
  # Another optimizer cannot continue the saved optimizer state: named, not an Orbax dump.
  proc = run_main_in_process(CONFIG, workdir,
                             *tiny(tfds_dir, "--config.optimizer.name=sgd"), check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "holds an optimizer state that does not fit this run" in proc.stderr
  assert "optimizer.name: 'adamw' -> 'sgd'" in proc.stderr

  data_dir = os.path.join(workdir, "checkpoints", "10", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data_dir):
    with open(os.path.join(data_dir, name), "r+b") as f:
      f.truncate(8)
  proc = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir, "--config.total_steps=20"),
                             check=False)
  assert proc.returncode == 1
  # No good step to fall back to: the run stops rather than start afresh (which would
  # in time delete the damaged checkpoint).
  assert (f"no usable checkpoint in {workdir}/checkpoints (step 10: files changed since "
          "the save:") in proc.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["10"]


@pytest.mark.parametrize("override,message", [
    ("--config.optimizer.learnin_rate=1",
     "unknown config key 'optimizer.learnin_rate' in --config.optimizer.learnin_rate: "
     "optimizer has no field 'learnin_rate'. Did you mean learning_rate?"),
    ("--config.input.dataset=digitz", "unknown dataset 'digitz'. Close matches: digits"),
    ("--config.model_name=vit_tiny_patch15_224",
     "unknown model 'vit_tiny_patch15_224'. Close matches: vit_tiny_patch16_224"),
    ("--config.input.pp_eval=decode|resize(18)|value_range(-1, 1)",
     "ViT with patch size 4 needs image sides divisible by 4; got 18x18. Resize or crop "
     "the input (e.g. to 16x16 or 20x20)"),
    ("--config.input.batch_size=30",
     "input.batch_size=30 must be divisible by the data-parallel devices (1) times "
     "grad_accum_steps (4)"),
    # Checked before anything is built or written (all such settings: test_faults.py).
    ("--config.log_every=0", "error: ValueError: config.log_every=0: must be an integer "
     ">= 1"),
])
def test_bad_input_is_one_clear_line(tfds_dir, tmp_path, override, message):
  # The first case is a subprocess (a user's own shell): it fails before JAX and
  # TensorFlow load, so it is cheap; the others run the same module in this process.
  run = run_main if override == "--config.optimizer.learnin_rate=1" else run_main_in_process
  proc = run(CONFIG, str(tmp_path / "bad"), *tiny(tfds_dir),
             "--config.grad_accum_steps=4", override, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints" / "10")


def test_data_parallel_and_grad_accumulation_match_one_device(tfds_dir, tmp_path):
  """8 virtual devices (data=8), and 4 microbatches, train like 1 device, 1 batch."""
  # Stochastic depth draws its masks per microbatch, so it is off for this comparison.
  # SGD keeps updates proportional to gradients; Adam would turn the float noise of
  # exactly-zero gradients (attention key biases) into full-size steps.
  common = ("--config.total_steps=10", "--config.model.drop_path_rate=0.0",
            "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.1")
  runs = {}
  for name, devices, extra in (("base", 1, ()), ("data8", 8, ()),
                               ("accum4", 1, ("--config.grad_accum_steps=4",))):
    workdir = str(tmp_path / name)
    if devices == 1:
      proc = run_main_in_process(CONFIG, workdir, *tiny(tfds_dir, *common, *extra))
    else:
      proc = run_main(CONFIG, workdir, *tiny(tfds_dir, *common, *extra), num_devices=devices)
    runs[name] = (final_params(workdir, 10), results(workdir))
    if name == "data8":
      assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in proc.stdout
  base_params, base_results = runs["base"]
  for name in ("data8", "accum4"):
    params, result = runs[name]
    for key in base_params:
      np.testing.assert_allclose(params[key], base_params[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name}: {key}")
    assert result["eval_loss"] == pytest.approx(base_results["eval_loss"], rel=1e-5)


def test_train_in_process_helper_reports_loss_history(tfds_dir, tmp_path):
  from helpers import train_in_process
  result = train_in_process(tfds_dir, tmp_path / "inproc", "vit_tiny_patch16_224",
                            steps=20, learning_rate=3e-3, input_size=16, image_size=16, patch_size=4,
                            hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  steps = [s for s, _ in result["train_loss_history"]]
  assert steps == [5, 10, 15, 20]
  losses = [l for _, l in result["train_loss_history"]]
  assert losses[-1] < losses[0]
  assert result["step"] == 20 and result["eval_count"] == 360
