"""One timm subprocess for the DeiT, CrossViT and TNT parity tests.

Starting torch costs ~5 CPU seconds, so the three modules' jobs (each module's
``timm_jobs()``: its input images and its jobs) run in a single ``timm_ref.py`` call,
once per session (per worker under xdist). Each module's ``timm_outputs`` fixture
takes its share::

  pytest_plugins = ["plain_timm"]  # shares the session fixture across the modules
"""

import pytest

from helpers import run_timm_reference

FAMILIES = ("deit", "crossvit", "tnt")


@pytest.fixture(scope="session")
def plain_timm_outputs(tmp_path_factory) -> dict:
  """``{family: (images, [outputs of its jobs, in order])}``."""
  import importlib  # pylint: disable=g-import-not-at-top
  job_sets = {f: importlib.import_module(f"test_{f}").timm_jobs() for f in FAMILIES}
  jobs = [job for _, family_jobs in job_sets.values() for job in family_jobs]
  outputs = run_timm_reference(jobs, tmp_path_factory.mktemp("timm_plain"))
  result, start = {}, 0
  for family, (images, family_jobs) in job_sets.items():
    result[family] = (images, outputs[start:start + len(family_jobs)])
    start += len(family_jobs)
  return result
