"""Fault injection: what a user sees when files are damaged, disks fill, losses diverge,
settings are out of range, or the filtering tool is pointed at the wrong place.

Each case asserts the user-visible outcome (the error line, the exit code) and that
the input data or the last good checkpoint is byte for byte unchanged. The trainers'
end-to-end cases (a flipped byte in the newest checkpoint resumed from the step
before, bit-identical; kills mid-save) are in tests/test_train.py and
tests/test_contrastive_train.py, where the runs they need already exist.
"""

import contextlib
import hashlib
import io
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import REPO, run_command, subprocess_env
from vit_jax import checkpoint, config_checks
from vit_jax.data import image_text
from vit_jax.tools import filter_pool
from vit_jax.trainers import common

sys.path.insert(0, os.path.join(REPO, "configs"))
import clip_digits  # noqa: E402  pylint: disable=g-import-not-at-top
import digits_vit  # noqa: E402  pylint: disable=g-import-not-at-top


def digests(directory):
  """``{relative path: SHA-256}`` of every file under ``directory``."""
  return {os.path.relpath(os.path.join(d, f), directory):
          hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
          for d, _, files in os.walk(directory) for f in files}


def state_at(step):
  return common.TrainState(
      step=jnp.int32(step), params={"w": jnp.arange(2000.0) + step},
      opt_state={"mu": jnp.full((300,), step, jnp.float32)}, model_state={})


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A checkpoint directory with steps 1, 2 and 3 (each state differs)."""
  directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  checkpointer = checkpoint.Checkpointer(directory, keep=3)
  for step in (1, 2, 3):
    checkpointer.save(step, state_at(step), {"step": step, "examples_seen": step})
  checkpointer.close()
  return directory


def largest_data_file(step_dir):
  paths = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
  return max(paths, key=os.path.getsize)


def flip(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 1
  open(path, "wb").write(bytes(data))


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "flipped_byte": (lambda step_dir: flip(largest_data_file(step_dir)),
                     "differs from what was written (SHA-256 mismatch)"),
    "truncated_file": (lambda step_dir: truncate(largest_data_file(step_dir)),
                       " were written"),
    "deleted_metadata": (lambda step_dir: os.remove(
        os.path.join(step_dir, "_CHECKPOINT_METADATA")), "_CHECKPOINT_METADATA is missing"),
    "deleted_array_metadata": (lambda step_dir: os.remove(
        os.path.join(step_dir, "state", "_METADATA")), "state/_METADATA is missing"),
    # Without its checksum record a step is still checked by Orbax reading it.
    "unrecorded_truncation": (lambda step_dir: (
        os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS_FILE)),
        truncate(largest_data_file(step_dir))), "Orbax cannot read it"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_good_step(
    three_steps, tmp_path, caplog, corruption):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(three_steps, directory)
  damage, problem = CORRUPTIONS[corruption]
  damage(os.path.join(directory, "3"))
  good = {step: digests(os.path.join(directory, str(step))) for step in (1, 2)}
  with caplog.at_level(logging.WARNING):
    restored = checkpoint.Checkpointer(directory).restore_latest(
        jax.eval_shape(lambda: state_at(0)))
  assert restored.step == 2
  expected = state_at(2)
  for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert f"checkpoint {directory}/3 is corrupt: " in caplog.text
  assert problem in caplog.text
  assert "resuming from the newest good checkpoint, step 2; the corrupt ones are kept " \
         f"as 3.corrupt under {directory}" in caplog.text
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt"]
  for step in (1, 2):
    assert digests(os.path.join(directory, str(step))) == good[step]
  # The files the tools read go through the same check.
  assert checkpoint.latest_step_dir(directory) == checkpoint.epath.Path(directory) / "2"


def test_no_good_checkpoint_stops_and_moves_nothing(three_steps, tmp_path):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(three_steps, directory)
  for step in (1, 2, 3):
    flip(largest_data_file(os.path.join(directory, str(step))))
  before = digests(directory)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.Checkpointer(directory).restore_latest(jax.eval_shape(lambda: state_at(0)))
  assert str(e.value).startswith(f"no usable checkpoint in {directory} (step 3: files "
                                 "changed since the save: ")
  assert "Move them away to start afresh, or use a new --workdir." in str(e.value)
  assert digests(directory) == before
  with pytest.raises(checkpoint.CheckpointError, match="is corrupt: files changed"):
    checkpoint.load_state_arrays(os.path.join(directory, "3"))


@contextlib.contextmanager
def disk_full_after(limit):
  """No file of this process may grow past ``limit`` bytes inside the block: writes
  fail with EFBIG, as on a full disk (the soft limit goes back up afterwards)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a kill
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_disk_full_save_keeps_earlier_checkpoints_and_the_rerun_resumes(tmp_path):
  directory = str(tmp_path / "checkpoints")
  big = lambda w: common.TrainState(step=jnp.int32(0), params={"w": w}, opt_state={},
                                    model_state={})
  state = big(jnp.arange(1_000_000.0))  # 4 MB: more than the disk will take
  checkpointer = checkpoint.Checkpointer(directory, keep=3)
  for step in (1, 2):
    checkpointer.save(step, state, {"step": step, "examples_seen": step})
  checkpointer.wait()
  before = digests(directory)
  with pytest.raises(checkpoint.CheckpointError) as e, disk_full_after(1_000_000):
    checkpointer.save(3, state, {"step": 3, "examples_seen": 3})
    checkpointer.wait()
  error = str(e.value)
  assert error.startswith(f"saving checkpoint {directory}/3 failed (")
  assert "File too large" in error
  assert error.endswith(
      "the earlier checkpoints are intact (steps 1, 2); free space (or fix the storage) "
      "and rerun the same command to resume from step 2")
  checkpointer.close()
  assert {k: v for k, v in digests(directory).items() if k.split(os.sep)[0] in ("1", "2")
          } == before
  # The rerun: a new process would start here.
  checkpointer = checkpoint.Checkpointer(directory)
  restored = checkpointer.restore_latest(jax.eval_shape(lambda: big(jnp.zeros(1_000_000))))
  assert restored.step == 2
  np.testing.assert_array_equal(np.asarray(restored.state.params["w"]),
                                np.arange(1_000_000.0))
  checkpointer.save(3, restored.state, {"step": 3, "examples_seen": 3})  # space again
  checkpointer.close()
  assert checkpoint.verify(checkpoint.epath.Path(directory) / "3") is None


def test_nan_stop_waits_for_the_save_in_flight_and_names_it(tmp_path):
  directory = str(tmp_path / "checkpoints")
  checkpointer = checkpoint.Checkpointer(directory)
  big = common.TrainState(step=jnp.int32(5), params={"w": jnp.ones((2000, 1000))},
                          opt_state={}, model_state={})
  checkpointer.save(5, big, {"step": 5, "examples_seen": 5})  # asynchronous
  guard = common.NonFiniteGuard()
  guard.add(6, jnp.bool_(False))
  with pytest.raises(common.DivergenceError) as e:
    guard.check(checkpointer.newest_committed)
  assert f"The last good checkpoint is kept intact: {directory}/5." in str(e.value)
  assert os.listdir(directory) == ["5"]
  assert checkpoint.verify(checkpoint.epath.Path(directory) / "5") is None
  checkpointer.close()


def test_metadata_writes_are_atomic(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  common.write_json(checkpoint.epath.Path(path), {"step": 1})
  before = path.read_bytes()

  def fail(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(type(checkpoint.epath.Path(path)), "replace", fail)
  with pytest.raises(OSError, match="No space left"):
    common.write_json(checkpoint.epath.Path(path), {"step": 2})
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


# ---------------------------------------------------------------- settings

def _bad_settings():
  cases = []
  for module in (digits_vit, clip_digits):
    config = module.get_config()
    for key, value in (("input.batch_size", 0), ("mesh.fsdp", 0), ("mesh.data", -2),
                       ("log_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 0),
                       ("total_steps", -5), ("eval_every", -1),
                       ("optimizer.learning_rate", float("nan")),
                       ("optimizer.b2", 1.0), ("schedule.warmup_steps", -1),
                       ("input.eval_batch_size", 0), ("grad_accum_steps", 0),
                       ("input.shuffle_buffer", 0), ("input.shards_per_window", 0),
                       ("input.threads", 0), ("tokenizer.context_length", 0),
                       ("label_smoothing", 1.0), ("max_logit_scale", 0.0), ("seed", -1),
                       ("model.hidden_size", 0), ("model.num_layers", -1),
                       ("model.image.num_heads", 0), ("model.text.mlp_dim", 0),
                       ("sparsity.update_every", 0), ("sparsity.sparsity", 1.0)):
      node = config
      *parents, leaf = key.split(".")
      for part in parents:
        node = node.get(part)
      if node is not None and leaf in node:
        cases.append((module.__name__, key, value))
  return cases


BAD_SETTINGS = _bad_settings()
ALLOWED = {"input.batch_size": "an integer >= 1", "mesh.fsdp": "an integer >= 1, or -1 "
           "for all remaining devices", "optimizer.b2": "a number in [0, 1)",
           "optimizer.learning_rate": "a finite number >= 0", "seed": "an integer >= 0",
           "model.text.mlp_dim": "an integer >= 1"}


@pytest.mark.parametrize("config_name,key,value", BAD_SETTINGS)
def test_every_bad_numeric_setting_is_named(config_name, key, value):
  config = sys.modules[config_name].get_config()
  with config.unlocked():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ValueError) as e:
    config_checks.validate(config)
  message = str(e.value)
  assert message.startswith(f"config.{key}={value!r}: must be "), message
  if key in ALLOWED:
    assert message == f"config.{key}={value!r}: must be {ALLOWED[key]}"


def test_both_demo_configs_validate():
  assert len(BAD_SETTINGS) == 39  # both trainers' keys are covered
  config_checks.validate(digits_vit.get_config())
  config_checks.validate(clip_digits.get_config())


def test_changed_settings_name_what_a_resume_changed():
  saved = digits_vit.get_config().to_dict()
  now = digits_vit.get_config()
  now.total_steps, now.seed, now.input.batch_size = 3000, 1, 64
  now.optimizer.name = "sgd"
  assert config_checks.changed_settings(saved, now.to_dict()) == [
      "input.batch_size: 128 -> 64", "optimizer.name: 'adamw' -> 'sgd'", "seed: 0 -> 1",
      "total_steps: 1500 -> 3000"]
  assert config_checks.changed_settings(None, now.to_dict()) == []


PTH = r"""
import importlib.util, sys, torch
# files.py alone, without the vit_jax.weights package (it imports jax): torch is the
# only heavy import this process needs.
spec = importlib.util.spec_from_file_location("files", sys.argv[2])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
torch.save({"epoch": 3, "w": torch.ones(2)}, sys.argv[1] + "/mixed.pth")
torch.save([torch.ones(2)], sys.argv[1] + "/list.pth")
for name in ("mixed.pth", "list.pth"):
  try:
    files.read_state_dict(sys.argv[1] + "/" + name)
  except files.LoadError as e:
    print(e)
"""


def test_pth_that_is_not_a_flat_tensor_mapping_is_named(tmp_path):
  # torch and TensorFlow abort when imported into one process: a subprocess.
  proc = subprocess.run([sys.executable, "-c", PTH, str(tmp_path),
                         os.path.join(REPO, "vit_jax", "weights", "files.py")],
                        env=subprocess_env(),
                        capture_output=True, text=True, timeout=300, check=True)
  assert proc.stdout.splitlines() == [
      f"{tmp_path}/mixed.pth is not a flat mapping of parameter names to tensors (not "
      "tensors: 'epoch' (int)). Save the model's state_dict(), or nest it under one of "
      "'state_dict', 'model', 'model_ema'",
      f"{tmp_path}/list.pth holds a list, not a mapping of parameter names to tensors"]


# ---------------------------------------------------------------- filter_pool

def png(size=(8, 8)) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_shard(path, keys, meta='{"bad": false}'):
  with image_text.ShardWriter(path, 1000) as writer:
    for key in keys:
      writer.write(key, {"png": png(), "txt": f"caption of {key}", "json": meta})


def filter_cli(capsys, shards, output_dir, *extra):
  code, out = run_command("vit_jax.tools.filter_pool", f"--shards={shards}",
                          f"--output_dir={output_dir}", *extra)
  return code, out, capsys.readouterr().err


def test_filter_refuses_an_output_dir_holding_its_input(tmp_path, capsys):
  write_shard(str(tmp_path / "out" / "shards" / "filtered-00000.tar"), ["a", "b", "c"])
  before = digests(tmp_path)
  code, _, err = filter_cli(capsys, tmp_path / "out" / "shards", tmp_path / "out")
  assert code == 1
  assert (f"error: --output_dir={tmp_path}/out holds the input shard {tmp_path}/out/shards/"
          "filtered-00000.tar: the output replaces that directory whole; choose another "
          "one") in err
  assert digests(tmp_path) == before


def test_filter_rerun_replaces_the_output_whole(tmp_path, capsys):
  write_shard(str(tmp_path / "pool.tar"), ["a", "b", "c"])
  out = tmp_path / "filtered"
  assert filter_cli(capsys, tmp_path / "pool.tar", out, "--samples_per_shard=1")[0] == 0
  assert len(os.listdir(out / "shards")) == 3
  code, stdout, _ = filter_cli(capsys, tmp_path / "pool.tar", out, "--samples_per_shard=10")
  assert code == 0 and "kept 3 of 3 samples" in stdout
  assert os.listdir(out / "shards") == ["filtered-00000.tar"]  # no stale shards
  assert sorted(os.listdir(tmp_path)) == ["filtered", "pool.tar"]  # no temporary left


def test_filter_keys_by_shard_and_rejects_unsafe_names(tmp_path, capsys):
  write_shard(str(tmp_path / "one.tar"), ["a", "b", "../escape"])
  write_shard(str(tmp_path / "two.tar"), ["a", "/abs/x", "c"], meta="[1, 2]")
  before = digests(tmp_path)
  summary = filter_pool.filter_pool(
      [str(tmp_path / "one.tar"), str(tmp_path / "two.tar")], str(tmp_path / "out"),
      ground_truth_key="bad")
  assert summary["pool_samples"] == 6 and summary["kept"] == 4
  assert summary["rejected"] == {"unsafe_name": 2}
  assert summary["ground_truth"]["good_pairs"] == 6  # a list as JSON meta marks nothing
  kept = open(tmp_path / "out" / "kept_ids.txt").read().split()
  assert kept == ["one/a", "b", "two/a", "c"]
  names = []
  for shard in image_text.expand_shards(str(tmp_path / "out" / "shards")):
    with tarfile.open(shard) as tar:
      names += tar.getnames()
  assert sorted(names) == sorted(f"{k}.{e}" for k in kept for e in ("json", "png", "txt"))
  for name in ("one.tar", "two.tar"):
    assert hashlib.sha256(open(tmp_path / name, "rb").read()).hexdigest() == before[name]


def test_a_member_over_the_size_cap_is_skipped_unread(tmp_path, monkeypatch):
  write_shard(str(tmp_path / "pool.tar"), ["a", "b", "c"])
  with tarfile.open(tmp_path / "pool.tar", "a") as tar:  # d's caption is huge
    for name, data in (("d.png", png()), ("d.txt", b"x" * 5000)):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  monkeypatch.setattr(image_text, "MAX_MEMBER_BYTES", 4096)
  read = []
  monkeypatch.setattr(tarfile.TarFile, "extractfile",
                      lambda self, m, real=tarfile.TarFile.extractfile: (
                          read.append(m.name), real(self, m))[1])
  stats = image_text.SkipStats()
  keys = [s["key"] for s in image_text.iterate_samples([str(tmp_path / "pool.tar")],
                                                        stats=stats)]
  assert keys == ["a", "b", "c"]
  assert stats.as_dict() == {"member_too_large": 1}
  assert "d.txt" not in read and "d.png" in read


def test_filter_input_errors_exit_non_zero_in_one_line(tmp_path, capsys):
  (tmp_path / "notes.tar").write_text("not a tar archive")
  code, _, err = filter_cli(capsys, tmp_path / "notes.tar", tmp_path / "out")
  assert code == 1 and "Traceback" not in err
  assert (f"error: {tmp_path}/notes.tar (matched by the shard spec) is not a tar file; "
          "give .tar shards only") in err
  with tarfile.open(tmp_path / "empty.tar", "w") as tar:
    info = tarfile.TarInfo("a.txt")
    info.size = 1
    tar.addfile(info, io.BytesIO(b"x"))
  code, _, err = filter_cli(capsys, tmp_path / "empty.tar", tmp_path / "out")
  assert code == 1
  assert "error: no usable sample in the 1 shard(s) given (1 samples skipped (1 " \
         "missing image))" in err
  write_shard(str(tmp_path / "pool.tar"), ["a", "b"])
  code, _, err = filter_cli(capsys, tmp_path / "pool.tar", tmp_path / "out",
                            f"--clip_workdir={tmp_path}", "--keep_fraction=0.5")
  assert code == 1 and "Traceback" not in err
  assert (f"error: scoring with --clip_workdir={tmp_path} failed: FileNotFoundError: "
          f"{tmp_path} is not a contrastive training workdir (no model.json)") in err
  assert not os.path.exists(tmp_path / "out")
