"""The contrastive trainer end to end, and everything that uses a trained workdir.

One tiny CLIP is trained on a tiny offline pool whose every shard also holds a
corrupt image and a caption-less sample: first through the real entry point on 2
devices (sharded loss), checkpointing every step, SIGKILLed after step 8, then resumed
in this process on 1 device from whichever checkpoint had been committed. The steps' recorded sample keys must be exactly the data
stream's, with nothing repeated or skipped. The workdir then serves the stand-alone
evaluators, CLIP-score filtering and the zero-shot colab.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from helpers import REPO, run_command, subprocess_env
from vit_jax import tree
from vit_jax.data import image_text
from vit_jax.tools import filter_pool, make_pool
from vit_jax.workdir import load_trained

CONFIG = "configs/clip_digits.py"
STEPS, BATCH, KILL_AFTER = 12, 16, 8
TINY = {
    "input.batch_size": BATCH, "input.eval_batch_size": 120,
    "input.shards_per_window": 2, "input.threads": 1, "input.record_keys": True,
    "model.image.hidden_size": 32, "model.image.num_layers": 1,
    "model.image.num_heads": 2, "model.image.mlp_dim": 64,
    "model.text.hidden_size": 32, "model.text.num_layers": 1, "model.text.num_heads": 2,
    "model.text.mlp_dim": 64, "model.embed_dim": 32,
    "optimizer.learning_rate": 3e-3, "schedule.warmup_steps": 2, "total_steps": STEPS,
    "log_every": 1, "eval_every": 0, "checkpoint_every": 1,
}


def overrides(pool, **extra):
  return [f"--config.input.pool={pool}"] + [
      f"--config.{k}={v}" for k, v in {**TINY, **extra}.items()]


def tiny_config(pool, **extra):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import clip_digits  # pylint: disable=g-import-not-at-top
  config = clip_digits.get_config()
  config.input.pool = pool
  for key, value in {**TINY, **extra}.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def add_bad_samples(shard: str, tag: str) -> None:
  """Appends a corrupt JPEG and a sample without caption to an existing shard."""
  with tarfile.open(shard, "a") as tar:
    for name, data in ((f"bad{tag}.jpg", b"\xff\xd8\xff not really a jpeg"),
                       (f"bad{tag}.txt", b"a corrupt image"),
                       (f"nocap{tag}.jpg", open(__file__, "rb").read()[:10])):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("pool"))
  make_pool.make_pool(directory, num_samples=120, samples_per_shard=24, eval_renders=1,
                      mismatch_fraction=0.25)
  for i, shard in enumerate(image_text.expand_shards(os.path.join(directory, "train"))):
    add_bad_samples(shard, str(i))
  # A smaller held-out set keeps the evaluations quick.
  raws = [raw for shard in image_text.expand_shards(os.path.join(directory, "eval"))
          for raw in image_text.read_shard(shard)]
  with image_text.ShardWriter(os.path.join(directory, "eval_small", "e-{:03d}.tar"),
                              1000) as writer:
    for raw in raws[::3]:  # 120 of the 360, every class
      writer.write(raw.key, raw.files)
  os.rename(os.path.join(directory, "eval"), os.path.join(directory, "eval_full"))
  os.rename(os.path.join(directory, "eval_small"), os.path.join(directory, "eval"))
  return directory


@pytest.fixture(scope="module")
def trained(pool, tmp_path_factory):
  """Killed after step 8 on 2 devices, resumed here on 1."""
  from vit_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("clip") / "run")
  keys_file = os.path.join(workdir, "samples_process0.txt")
  cmd = [sys.executable, "-m", "vit_jax.main", f"--config={CONFIG}",
         f"--workdir={workdir}", *overrides(pool)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(num_devices=2),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  killed_after = 0
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    lines = open(keys_file).read().splitlines() if os.path.exists(keys_file) else []
    if len(lines) >= KILL_AFTER:
      proc.send_signal(signal.SIGKILL)
      killed_after = len(lines)
      break
    time.sleep(0.002)
  first_output = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, first_output[-3000:]
  assert KILL_AFTER <= killed_after < STEPS
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    result = contrastive.train_and_evaluate(tiny_config(pool), workdir)
  resumed = re.search(r"resumed from .*/checkpoints/(\d+) \(step \d+", console.getvalue())
  assert resumed, console.getvalue()[-2000:]
  return {"workdir": workdir, "result": result, "first_output": first_output,
          "killed_after": killed_after, "resumed_from": int(resumed.group(1)),
          "output": console.getvalue()}


def test_resume_after_kill_continues_the_data_stream_exactly(trained, pool):
  lines = open(os.path.join(trained["workdir"], "samples_process0.txt")).read().splitlines()
  steps = [int(line.split(" ", 1)[0]) for line in lines]
  # Saves are asynchronous: the kill leaves a committed checkpoint some steps back.
  # The steps after it were recorded by the killed run, dropped and redone.
  assert 0 < trained["resumed_from"] < trained["killed_after"]
  assert steps == list(range(1, STEPS + 1))
  consumed = [key for line in lines for key in line.split()[1:]]
  # The stream the trainer reads, computed independently: 1.5 epochs of the pool.
  stream = image_text.ImageTextStream(
      image_text.expand_shards(os.path.join(pool, "train")), seed=0, shards_per_window=2)
  iterator = iter(stream)
  expected = []
  while len(expected) < STEPS * BATCH:
    key = next(iterator)[0]["key"]
    if not key.startswith("bad"):  # the stream leaves decoding to tf.data's threads
      expected.append(key)
  assert consumed == expected
  assert len(set(expected[:120])) == 120  # one epoch: every usable sample once
  assert "mesh {'data': 2," in trained["first_output"]


def test_training_learns_and_reports(trained, capsys):
  result = trained["result"]
  assert result["step"] == STEPS and result["examples_seen"] == STEPS * BATCH
  history = trained["result"]["train_loss_history"]
  assert [s for s, _ in history] == list(range(trained["resumed_from"] + 1, STEPS + 1))
  # The loss of the last steps (resumed run) is below that of the first step (killed
  # run, before any update).
  first = [line for line in trained["first_output"].splitlines()
           if line.startswith(f"step 1/{STEPS} ")]
  first_loss = float(first[0].split("loss ")[1].split(" ")[0])
  assert np.mean([loss for _, loss in history[-3:]]) < first_loss - 0.05
  assert 0 <= result["eval/zero_shot/digits/top1"] <= 1
  assert result["eval/zero_shot/digits/count"] == 120
  assert result["eval/retrieval/digits/count"] == 120
  for k in (1, 5, 10):
    assert 0 <= result[f"eval/retrieval/digits/i2t_recall@{k}"] <= 1
  assert result["eval/retrieval/digits/i2t_recall@10"] >= result[
      "eval/retrieval/digits/i2t_recall@1"]
  # Bad samples were skipped, counted and reported; the run went on.
  skipped = result["skipped_samples"]
  assert skipped["corrupt_image"] >= 1 and skipped["missing_caption"] >= 1
  assert "corrupt image" in trained["first_output"] and "data: " in trained["first_output"]
  with open(os.path.join(trained["workdir"], "results.json")) as f:
    assert json.load(f)["step"] == STEPS


def test_rerunning_a_step_gives_identical_parameters(trained, pool, tmp_path):
  """The last step again, from the previous checkpoint: the same parameters, bit for bit
  (the data, the preprocessing randomness and the step are deterministic)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "rerun"
  shutil.copytree(trained["workdir"], workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  config = tiny_config(pool)
  config.evals = ml_collections.ConfigDict()
  contrastive.train_and_evaluate(config, str(workdir))
  load = lambda w: checkpoint.load_state_arrays(os.path.join(w, "checkpoints", str(STEPS)))
  leaves = [jax.tree_util.tree_leaves_with_path(load(w)["params"])
            for w in (trained["workdir"], str(workdir))]
  assert len(leaves[0]) == len(leaves[1]) > 10
  for (path, a), (_, b) in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_standalone_evaluators_reproduce_the_trainers_numbers(trained, pool):
  result = trained["result"]
  code, out = run_command("vit_jax.tools.zero_shot", f"--workdir={trained['workdir']}",
                          f"--shards={pool}/eval", "--classnames=digits",
                          "--templates=digits_heldout", "--batch_size=120")
  assert code == 0, out
  standalone = json.loads(out.strip().splitlines()[-1])
  assert standalone["step"] == STEPS and standalone["count"] == 120
  assert standalone["top1"] == pytest.approx(result["eval/zero_shot/digits/top1"])
  code, out = run_command("vit_jax.tools.retrieval", f"--workdir={trained['workdir']}",
                          f"--shards={pool}/eval", "--batch_size=120")
  assert code == 0, out
  standalone = json.loads(out.strip().splitlines()[-1])
  for key in ("i2t_recall@1", "t2i_recall@5", "t2i_recall@10"):
    assert standalone[key] == pytest.approx(result[f"eval/retrieval/digits/{key}"])


def test_clip_score_filtering_with_a_trained_workdir(trained, pool, tmp_path):
  shards = image_text.expand_shards(os.path.join(pool, "train"))
  out = str(tmp_path / "top")
  summary = filter_pool.filter_pool(shards, out, clip_workdir=trained["workdir"],
                                    keep_fraction=0.5, samples_per_shard=50,
                                    ground_truth_key="mismatched", batch_size=40)
  assert summary["pool_samples"] == 125  # 120 usable + 5 corrupt (caption-less: unread)
  assert summary["kept"] == 60 and summary["rejected"] == {"clip_score": 60,
                                                          "corrupt_image": 5}
  rows = [line.split("\t") for line in open(os.path.join(out, "scores.tsv"))][1:]
  scores = {key: float(score) for key, score, _ in rows if score}
  kept = open(os.path.join(out, "kept_ids.txt")).read().split()
  assert len(kept) == 60 and min(scores[k] for k in kept) == pytest.approx(
      summary["clip_threshold"], abs=1e-6)  # scores.tsv has 6 decimals
  assert max(s for k, s in scores.items() if k not in kept) <= summary["clip_threshold"]
  # The scores are the model's cosine similarities.
  model = load_trained(trained["workdir"])
  sample = next(iter(image_text.iterate_samples(shards[:1])))
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  image = preprocess.parse(model.pp_eval)({"image": sample["image"]})["image"].numpy()
  zimg, ztxt, _ = model.model.apply(model.variables, image[None],
                                    model.tokenizer.encode([sample["caption"]]))
  assert float(np.sum(zimg * ztxt)) == pytest.approx(scores[sample["key"]], abs=1e-5)
  # Re-sharded subset: exactly the kept samples, trainable as a pool.
  resharded = list(image_text.iterate_samples(image_text.expand_shards(out + "/shards")))
  assert sorted(s["key"] for s in resharded) == sorted(kept)
  truth = summary["ground_truth"]
  assert 0 <= truth["precision"] <= 1 and truth["good_pairs"] == 120 - sum(
      s["meta"]["mismatched"] for s in image_text.iterate_samples(shards))
  at_half = [row for row in truth["by_keep_fraction"] if row["keep_fraction"] == 0.5]
  assert at_half[0]["precision"] == pytest.approx(truth["precision"])  # same 60 kept
  # Threshold mode keeps everything at or above it.
  threshold = float(np.median(list(scores.values())))
  summary = filter_pool.filter_pool(shards, str(tmp_path / "threshold"),
                                    clip_workdir=trained["workdir"],
                                    clip_threshold=threshold, batch_size=40)
  assert summary["kept"] == sum(s >= threshold for s in scores.values())


def test_filter_scoring_error_is_one_line_and_closes_its_stream(trained, pool, tmp_path,
                                                               monkeypatch):
  # A workdir whose model.json does not fit its checkpoint (another embedding width).
  workdir = str(tmp_path / "mismatched")
  shutil.copytree(trained["workdir"], workdir,
                  ignore=shutil.ignore_patterns("tensorboard", "samples_*"))
  with open(os.path.join(workdir, "model.json")) as f:
    info = json.load(f)
  info["model"]["embed_dim"] *= 2
  with open(os.path.join(workdir, "model.json"), "w") as f:
    json.dump(info, f)
  # The scoring stream (a tf.data iterator over a Python generator) must be closed
  # when the error surfaces, not whenever its traceback is freed: one still open at
  # interpreter exit can hang the exit.
  streams, make_eval_batches = [], image_text.make_eval_batches

  def tracked(*args, **kwargs):
    stream = {"closed": False}
    streams.append(stream)
    try:
      yield from make_eval_batches(*args, **kwargs)
    finally:
      stream["closed"] = True

  monkeypatch.setattr(image_text, "make_eval_batches", tracked)
  shards = image_text.expand_shards(os.path.join(pool, "train"))
  with pytest.raises(ValueError) as e:
    filter_pool.filter_pool(shards, str(tmp_path / "out"), clip_workdir=workdir,
                            keep_fraction=0.5, batch_size=40)
  # e still holds the traceback, and with it the frame that iterated the stream.
  assert len(streams) == 1 and streams[0]["closed"]
  assert str(e.value).startswith(f"scoring with --clip_workdir={workdir} failed: "
                                 "ScopeParamShapeError: For parameter \"kernel\" in ")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "out")


def test_zero_shot_colab_runs(trained, pool, tmp_path, monkeypatch):
  """As a Colab user runs it (see tests/test_colabs.py): from an empty directory, the
  installed package, no PYTHONPATH."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(REPO, "colabs", "zero_shot.ipynb"), as_version=4)
  for key, value in {"VIT_JAX_CLIP_WORKDIR": trained["workdir"],
                     "VIT_JAX_IMAGES": os.path.join(pool, "eval"),
                     "VIT_JAX_NUM_IMAGES": "64", "JAX_PLATFORMS": "cpu"}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.delenv("VIT_JAX_CONFIGS", raising=False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}}).execute()
  assert os.listdir(cwd) == [], "the notebook wrote into the working directory"
  outputs = "".join(o.get("text", "") for cell in notebook.cells
                    if cell.cell_type == "code" for o in cell.outputs)
  imported = re.search(r"vit_jax \S+ from (.+)", outputs).group(1).strip()
  assert os.path.realpath(imported) == os.path.realpath(os.path.join(REPO, "vit_jax"))
  assert f"at step {STEPS}" in outputs
  assert "zero-shot top-1 on 64 held-out images" in outputs
  assert "compiling the train step" not in outputs  # it used the trained workdir


def test_configuration_errors_are_clear(pool, tmp_path):
  from vit_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(image_text.DataError, match="no shards match"):
    contrastive.train_and_evaluate(
        tiny_config(pool, **{"input.train_shards": str(empty)}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="config.model.text.vocab_size=7 but the tokenizer"):
    contrastive.train_and_evaluate(tiny_config(pool, **{"model.text.vocab_size": 7}),
                                   str(tmp_path / "b"))
  with pytest.raises(ValueError, match="siglip loss needs config.model.logit_bias_init"):
    contrastive.train_and_evaluate(tiny_config(pool, loss="siglip"), str(tmp_path / "c"))


def test_sharding_rules_of_the_config_lay_out_the_train_state(pool, tmp_path, monkeypatch):
  """config.sharding reaches the train state: a custom rule puts the text tower's MLP
  over "fsdp" (the default: "tensor") on a 2x2 (fsdp x tensor) mesh."""
  from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top

  class Laid(Exception):  # stops the trainer once its state's layout is known
    pass

  mesh = AbstractMesh((1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  state_shardings = sharding.state_shardings
  laid = {}

  def lay_out_on_four_devices(abstract_state, _, sharding_config=None):
    laid.update(state_shardings(abstract_state, mesh, sharding_config).params)
    raise Laid

  monkeypatch.setattr(sharding, "state_shardings", lay_out_on_four_devices)
  name = "txt/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
  for rules, expected in ((None, P(None, "tensor")), ({"mlp": "fsdp"}, P(None, "fsdp"))):
    config = tiny_config(pool)
    if rules:
      config.sharding.rules.update(rules)
    with pytest.raises(Laid):
      contrastive.train_and_evaluate(config, str(tmp_path / "w"))
    assert tree.flatten(laid)[name].spec == expected, rules


def test_datacomp_configs_follow_the_scale_table():
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import clip_datacomp  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  expected = {  # DataComp's scale_configs.py: model, samples, batch, lr, warmup, beta2
      "small": ("clip_vit_base_patch32_224", 12_800_000, 4096, 5e-4, 500, 0.98),
      "medium": ("clip_vit_base_patch32_224", 128_000_000, 4096, 5e-4, 500, 0.98),
      "large": ("clip_vit_base_patch16_224", 1_280_000_000, 8192, 5e-4, 500, 0.98),
      "xlarge": ("clip_vit_large_patch14_224", 12_800_000_000, 90_112, 1e-3, 10_000, 0.95),
  }
  for scale, (model, samples, batch, lr, warmup, beta2) in expected.items():
    config = clip_datacomp.get_config(scale)
    assert (config.model_name, config.total_samples, config.input.batch_size,
            config.optimizer.learning_rate, config.schedule.warmup_steps,
            config.optimizer.b2) == (model, samples, batch, lr, warmup, beta2)
    assert (config.optimizer.weight_decay, config.optimizer.eps, config.loss) == (
        0.2, 1e-6, "clip")
    assert model in models.list_models(family="two_tower")
  siglip = clip_datacomp.get_config("large,siglip")
  assert siglip.loss == "siglip" and siglip.model.logit_bias_init == -10.0
  with pytest.raises(ValueError, match="unknown DataComp scale 'huge'"):
    clip_datacomp.get_config("huge")


def test_datacomp_siglip_config_trains_a_few_steps(pool, tmp_path, capsys):
  """The DataComp config's path (bf16, SigLIP ring loss in chunks), shrunk."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import clip_datacomp  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import contrastive  # pylint: disable=g-import-not-at-top
  config = clip_datacomp.get_config("small,siglip")
  config.input.train_shards = os.path.join(pool, "train")
  config.tokenizer.path = os.path.join(pool, "tokenizer.json")
  config.tokenizer.context_length = 24
  config.input.pp_train = "decode|random_resized_crop(32, scale=(0.9, 1.0))"
  config.input.batch_size, config.siglip_chunk_size = 16, 8
  config.model.image_model = "vit_tiny_patch16_224"
  config.model.image = dict(image_size=32, patch_size=16, hidden_size=32, num_layers=1,
                            num_heads=2, mlp_dim=64)
  config.model.text = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  config.model.embed_dim = 16
  config.total_samples, config.schedule.warmup_steps = 4 * 16, 1
  config.log_every = config.checkpoint_every = 2
  result = contrastive.train_and_evaluate(config, str(tmp_path / "siglip"))
  output = capsys.readouterr().out
  assert result["step"] == 4 and "(siglip loss)" in output
  assert all(np.isfinite(loss) for _, loss in result["train_loss_history"])
  assert "zero-shot eval 'imagenet' skipped" in output
  assert "retrieval eval 'heldout' skipped" in output
  info = json.load(open(tmp_path / "siglip" / "model.json"))
  assert info["model"]["dtype"] == "bfloat16" and info["model"]["logit_bias_init"] == -10.0


def test_quantize_command_takes_a_contrastive_workdir(trained, tmp_path):
  """int8 PTQ of both towers, zero-shot before and after (docs/quantization.md)."""
  code, out = run_command("vit_jax.tools.quantize", f"--workdir={trained['workdir']}",
                          "--mode=int8", f"--out={tmp_path / 'q'}")
  assert code == 0, out
  result = json.loads(out.strip().splitlines()[-1])
  assert result["step"] == STEPS and result["zero_shot/digits/count"] == 120
  assert result["float_zero_shot/digits/top1"] == pytest.approx(
      trained["result"]["eval/zero_shot/digits/top1"])
  assert 0 <= result["quantized_zero_shot/digits/top1"] <= 1
  # Kernels shrink 4x; this tiny model's token and position embeddings stay float.
  assert result["quantized_param_bytes"] < 0.6 * result["float_param_bytes"]
  saved = json.loads((tmp_path / "q" / "quantization.json").read_text())
  assert saved["mode"] == "int8" and saved["model_name"] == "clip_vit_base_patch32_224"
