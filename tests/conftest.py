"""Shared test fixtures: CPU-only JAX, one prepared TFDS dir, subprocess runners."""

import os

# Before JAX or TF are imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# XLA:CPU compiles threefry's random-bit generation slowly: a 1-layer ViT's init and
# train step took 22 s to compile with it and 12 s with "rbg" (which draws its bits
# with XLA's RngBitGenerator). Tests only compare runs made under the same setting, and
# subprocesses inherit it. `JAX_DEFAULT_PRNG_IMPL=threefry2x32 make test` runs the default.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# Most tests compile small programs and run them a few times: XLA's optimisation passes
# cost more than they save (whole suite, 2 workers: 906 s with them, 785 s without).
# Numerics are still checked against the references at the same tolerances.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The suite compiles many programs more than once: training subprocesses rerun after a
# kill, the same model in several test files. One compilation cache for the session,
# created here in pytest's main process and inherited by the xdist workers and their
# subprocesses, compiles each once (tests/test_train.py: 15% less CPU time).
# A reader that meets an entry being written recompiles (JAX warns and goes on).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _cache_dir = tempfile.mkdtemp(prefix="vit_jax_test_compile_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import pytest  # noqa: E402

from helpers import run_timm_reference  # noqa: E402


def _built_once(tmp_path_factory, name: str, build):
  """``build(directory)`` once per test session, shared by all xdist workers.

  Each worker used to build its own TFDS digits and pretrain its own checkpoint
  (~30 s each on 2 cores); a file lock lets the first worker build while the others
  wait, then all read the same directory (which no test writes to). Returns what
  ``build`` returned (JSON-serialisable).
  """
  import json  # pylint: disable=g-import-not-at-top
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above the workers' own
  path = root / name
  with filelock.FileLock(str(path) + ".lock"):
    done = root / f"{name}.json"
    if not done.exists():
      path.mkdir()
      done.write_text(json.dumps(build(str(path))))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the offline digits dataset prepared once per session."""
  from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  def build(path):
    input_pipeline.get_builder("digits", data_dir=path)
    return path
  return _built_once(tmp_path_factory, "tfds", build)


@pytest.fixture
def timm_reference(tmp_path):
  """``timm_reference(jobs)``: see ``helpers.run_timm_reference``."""
  return lambda jobs: run_timm_reference(jobs, tmp_path)


@pytest.fixture(scope="session")
def digits_pretrained(tfds_dir, tmp_path_factory):
  """A short digits pretraining (16x16, ten classes, 150 steps): ``(workdir, result)``.

  Stands in for the demo checkpoint in the fine-tuning tests and colabs (read only).
  """
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import REPO  # pylint: disable=g-import-not-at-top
  from vit_jax.trainers import classification  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import digits_vit  # pylint: disable=g-import-not-at-top

  def build(workdir):
    config = digits_vit.get_config()
    config.input.data_dir = tfds_dir
    config.input.batch_size = 64
    config.model.drop_path_rate = 0.0
    config.total_steps = 150
    config.schedule.warmup_steps = 15
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint_every = 150
    config.tensorboard_pictures = False
    return workdir, classification.train_and_evaluate(config, workdir)
  workdir, result = _built_once(tmp_path_factory, "digits_pretrained", build)
  return workdir, result
