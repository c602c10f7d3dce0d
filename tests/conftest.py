"""Shared test fixtures: CPU-only JAX, one prepared TFDS dir, subprocess runners."""

import os

# Before JAX or TF are imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

from helpers import run_timm_reference  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with the offline digits dataset prepared once per session."""
  from vit_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_builder("digits", data_dir=path)
  return path


@pytest.fixture
def timm_reference(tmp_path):
  """``timm_reference(jobs)``: see ``helpers.run_timm_reference``."""
  return lambda jobs: run_timm_reference(jobs, tmp_path)
