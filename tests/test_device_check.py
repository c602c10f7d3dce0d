"""``python -m vit_jax.tools.device_check --tiny``: every stage runs, on CPU.

The command is what an accelerator session runs first; here it runs at tiny sizes
(timm eager) in a subprocess, which also shows that its import chain stays free of
TensorFlow, TFDS, clu and ml_collections (the lent GPU machine has none of them).
The numbers of a tiny CPU run mean nothing; the test checks the rows and that the
correctness rows pass.
"""

import json
import os
import subprocess
import sys

import pytest

from vit_jax import kernels


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "vit_jax.tools.device_check", f"--out={out}",
                         "--tiny"], capture_output=True, text=True, env=env, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out, json.loads((out / "device_check.json").read_text()), proc.stdout


def test_every_stage_reports_rows(report):
  out, data, printed = report
  assert data["tiny"] and data["environment"]["platform"] == "cpu"
  checks = data["correctness"]
  assert {(c["op"], c["impl"]) for c in checks} == {
      ("linear", "pallas (Mosaic GPU)"), ("global", "pallas_triton")}
  for c in checks:
    assert c["passed"] and 0 <= c["max_error"] < 2e-2, c
  timed = {r["op"] for r in data["kernels"] if r["impl"] == "xla" and r["time_ms"] > 0}
  assert timed == set(kernels.OPS)
  (train,) = data["training"]
  assert train["model"] == "vit_base_patch16_224" and train["mode"] == "train"
  assert train["images_per_s"] > 0 and train["timm_eager_images_per_s"] > 0
  swin, maxvit, effvit = data["inference"]
  assert swin["images_per_s"] > 0 and swin["timm_eager_images_per_s"] > 0
  assert "skipped" in maxvit["note"] and "skipped" in effvit["note"]
  table = (out / "device_check.md").read_text()
  for title in ("1. Correctness", "2. Kernel timings", "3. Training step", "4. Inference",
                "TINY smoke run"):
    assert title in table
  assert table in printed  # the table a session pastes into docs/gpu.md


def test_writes_an_auto_table_and_imports_no_tensorflow(report):
  out, data, _ = report
  written = json.loads((out / "auto_table.json").read_text())
  kernels.check_auto_table(written["table"])
  assert "measured by `python -m vit_jax.tools.device_check`" in written["source"]
  assert set(written["measured"]) == set(kernels.OPS)
  assert data["environment"]["heavy_modules_imported"] == []
