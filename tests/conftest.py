"""Shared test fixtures: CPU-only JAX, one prepared TFDS dir, subprocess runners."""

import json
import os
import subprocess
import sys

# Before JAX or TF are imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import REPO, subprocess_env  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the offline digits dataset prepared once per session."""
  from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_builder("digits", data_dir=path)
  return path


@pytest.fixture
def timm_reference(tmp_path):
  """Runs timm jobs in a subprocess (torch never meets TF); returns loaded ``.npz``s.

  ``timm_reference([{"model": ..., "kwargs": ..., "images": array, ...}])``
  """
  def run(jobs: list[dict]) -> list[dict]:
    specs = []
    for i, job in enumerate(jobs):
      job = dict(job)
      np.save(tmp_path / f"in{i}.npy", np.asarray(job.pop("images"), np.float32))
      specs.append({**job, "input": str(tmp_path / f"in{i}.npy"),
                    "out": str(tmp_path / f"out{i}.npz")})
    (tmp_path / "jobs.json").write_text(json.dumps(specs))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "timm_ref.py"),
                           str(tmp_path / "jobs.json")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
      raise AssertionError(f"timm reference failed:\n{proc.stderr[-5000:]}")
    return [dict(np.load(s["out"])) for s in specs]
  return run
