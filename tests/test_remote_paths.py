"""gs:// paths everywhere outside Orbax and TensorBoard, on an in-memory "bucket".

Every file our code touches goes through etils.epath. With TensorFlow installed epath
sends gs:// to tf.io.gfile, which needs the network; these tests send it to epath's
fsspec backend instead (``gpath._is_tf_installed`` patched to False) and register an
in-memory fsspec filesystem under the ``gs``/``gcs`` protocols, so the code under
test sees real ``gs://bucket/...`` strings and no local file is involved.

Orbax (tensorstore's own GCS driver) and TensorBoard (tf.summary's own tf.io.gfile)
cannot write to that in-memory filesystem: the tests redirect only their two
directories (``workdir/checkpoints`` and ``workdir/tensorboard``) to a local folder
and say so. Everything else the contrastive trainer reads or writes (shards, the
tokenizer, ``config.json``, ``model.json``, the tokenizer copy, ``results.json`` and
the per-step sample-key log) stays in the bucket, as do the pool that ``make_pool``
writes, ``export``'s files read back by ``weights.read`` and ``filter_pool``'s output.
"""

import contextlib
import io
import json
import os
import sys

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from helpers import REPO


class InMemoryGCS(MemoryFileSystem):
  """fsspec's memory filesystem answering to gs:// (its own store, not memory://'s)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close  # what epath passes to gcsfs
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)

  def glob(self, path, **kwargs):  # gcsfs answers "bucket/key" (epath adds "gs://")
    return [p.lstrip("/") for p in super().glob(path, **kwargs)]


@pytest.fixture(scope="module")
def bucket():
  """``gs://bucket`` in memory for this module's tests; yields a function mapping a
  gs:// path to the local folder Orbax and TensorBoard write to instead."""
  local_root = epath.Path(os.environ.get("TMPDIR", "/tmp")) / f"gcs-{os.getpid()}"
  saved = {name: fsspec.registry.get(name) for name in ("gs", "gcs")}
  fsspec.register_implementation("gs", InMemoryGCS, clobber=True)
  fsspec.register_implementation("gcs", InMemoryGCS, clobber=True)
  tf_check = gpath._is_tf_installed  # pylint: disable=protected-access
  gpath._is_tf_installed = lambda: False  # pylint: disable=protected-access
  try:
    yield lambda path: str(path).replace("gs://", f"{local_root}/", 1)
  finally:
    gpath._is_tf_installed = tf_check  # pylint: disable=protected-access
    for name, cls in saved.items():
      if cls is not None:
        fsspec.register_implementation(name, cls, clobber=True)
    InMemoryGCS.store.clear()
    InMemoryGCS.pseudo_dirs[:] = [""]
    if local_root.exists():
      local_root.rmtree()


@pytest.fixture(scope="module")
def pool(bucket):
  from vit_jax.tools import make_pool  # pylint: disable=g-import-not-at-top
  make_pool.make_pool("gs://bucket/pool", num_samples=48, samples_per_shard=16,
                      eval_renders=1, vocab_size=200)
  return "gs://bucket/pool"


def test_make_pool_writes_to_the_bucket(pool):
  names = sorted(p.name for p in epath.Path(pool, "train").iterdir())
  assert names == ["pool-00000.tar", "pool-00001.tar", "pool-00002.tar"]
  assert json.loads(epath.Path(pool, "pool.json").read_text())["train"]["samples"] == 48
  # In the in-memory store, not on disk as a relative "gs:/bucket/..." path.
  assert "/bucket/pool/tokenizer.json" in InMemoryGCS.store
  assert not os.path.exists("gs:") and not os.path.exists(os.path.join(REPO, "gs:"))


def tiny_clip_config(pool, steps):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import clip_digits  # pylint: disable=g-import-not-at-top
  config = clip_digits.get_config()
  config.input.pool = pool
  config.input.batch_size = 8
  config.input.shards_per_window = 2
  config.input.threads = 1
  config.input.record_keys = True
  config.model.image.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  config.model.text.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  config.model.embed_dim = 32
  # A constant rate: the step's program does not depend on total_steps, so the
  # resumed run reuses the first run's compilation (the suite's compilation cache).
  config.schedule.update(warmup_steps=0, decay="constant")
  config.total_steps = steps
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval_every = 0
  config.evals.zero_shot.digits.classnames = None  # evaluators are tested elsewhere
  config.evals.retrieval.digits.shards = None
  return config


def test_contrastive_trainer_runs_and_resumes_on_gs(pool, bucket, monkeypatch):
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import common, contrastive  # pylint: disable=g-import-not-at-top

  # Orbax and TensorBoard have their own gs:// clients: only their folders go local.
  class LocalCheckpointer(checkpoint.Checkpointer):
    def __init__(self, directory, **kwargs):
      super().__init__(bucket(directory), **kwargs)

  make_writer = common.make_writer
  monkeypatch.setattr(checkpoint, "Checkpointer", LocalCheckpointer)
  monkeypatch.setattr(common, "make_writer",
                      lambda logdir, config=None: make_writer(bucket(logdir), config))

  workdir = "gs://bucket/runs/clip"
  contrastive.train_and_evaluate(tiny_clip_config(pool, 2), workdir)
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    result = contrastive.train_and_evaluate(tiny_clip_config(pool, 3), workdir)
  assert "resumed from" in console.getvalue() and "(step 2," in console.getvalue()
  assert result["step"] == 3 and result["examples_seen"] == 24

  run = epath.Path(workdir)
  assert sorted(p.name for p in run.iterdir() if p.is_file()) == [
      "config.json", "model.json", "results.json", "samples_process0.txt",
      "tokenizer.json"]
  assert json.loads((run / "results.json").read_text())["step"] == 3
  log = (run / "samples_process0.txt").read_text().splitlines()
  assert [int(line.split()[0]) for line in log] == [1, 2, 3]
  assert all(len(line.split()) == 1 + 8 for line in log)
  copied = Tokenizer.load(run / "tokenizer.json", context_length=24)
  original = Tokenizer.load(f"{pool}/tokenizer.json", context_length=24)
  np.testing.assert_array_equal(copied.encode(["a red digit seven"]),
                                original.encode(["a red digit seven"]))
  # Only Orbax's and TensorBoard's folders are local.
  assert sorted(os.listdir(bucket(workdir))) == ["checkpoints", "tensorboard"]


def test_export_and_init_from_read_gs_files(bucket, monkeypatch, tmp_path):
  from vit_jax import export, models, weights  # pylint: disable=g-import-not-at-top
  from vit_jax.weights import files  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(files, "REMOTE_CACHE", str(tmp_path / "cache"))
  model = models.create("vit_tiny_patch16_224", image_size=16, patch_size=8,
                        hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                        num_classes=3)
  params = {"embedding": {"kernel": np.ones((8, 8, 3, 16), np.float32)},
            "head": {"bias": np.arange(3, dtype=np.float32)}}
  export.to_npz(params, "gs://bucket/export/w.npz")
  arrays, fmt = weights.read("gs://bucket/export/w.npz", model)
  assert fmt and arrays["head/bias"].tolist() == [0.0, 1.0, 2.0]
  assert arrays["embedding/kernel"].shape == (8, 8, 3, 16)
  # The copy is reused, and refreshed when the remote file changes size.
  local = files.fetch_remote("gs://bucket/export/w.npz")
  assert local.startswith(str(tmp_path / "cache")) and os.path.getsize(local) == (
      epath.Path("gs://bucket/export/w.npz").stat().length)
  with pytest.raises(FileNotFoundError, match="gs://bucket/export/missing.npz"):
    weights.read("gs://bucket/export/missing.npz", model)


def test_filter_pool_reads_and_writes_gs(pool):
  from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import filter_pool  # pylint: disable=g-import-not-at-top
  shards = image_text.expand_shards(f"{pool}/train")
  assert all(s.startswith("gs://bucket/pool/train/") for s in shards)
  out = "gs://bucket/filtered"
  for _ in range(2):  # the second run replaces the first output whole
    summary = filter_pool.filter_pool(shards, out, min_caption_words=5)
  kept = epath.Path(out, "kept_ids.txt").read_text().split()
  assert 0 < len(kept) < 48 and summary["kept"] == len(kept)
  written = [raw.key for s in image_text.expand_shards(f"{out}/shards")
             for raw in image_text.read_shard(s)]
  assert written == kept
  # The build and the replaced output went: nothing hidden is left beside it.
  assert not [p.name for p in epath.Path("gs://bucket").iterdir()
              if p.name.startswith(".")]
  assert summary["shards"] == [f"{out}/shards/filtered-00000.tar"]
