"""The benchmark command runs end to end at tiny size (correctness, not speed).

Nothing here is timed or compared against a speed: the test checks that
``python -m vit_jax.benchmark`` runs both modes, reports positive numbers, counts the
parameters the registry counts, skips an unregistered name with a note, and writes
its CSV/JSON/Markdown outputs. The timm comparison is exercised by the documented
command in ``docs/benchmarks.md``, not here (torch start-up and ``torch.compile``
would cost the suite minutes).
"""

import csv
import json
import subprocess
import sys

from helpers import REPO, subprocess_env
from vit_jax.tools import benchmark
from vit_jax import models

MODEL = "vit_tiny_patch16_224"
OVERRIDES = {"num_layers": 1, "image_size": 32}


def test_benchmark_command_tiny(tmp_path):
  out_json, out_csv, out_md = (tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.md")
  out_md.write_text("# Title\n\n" + benchmark.TABLE_BEGIN + "\nold table\n"
                    + benchmark.TABLE_END + "\n\nFooter.\n")
  cmd = [sys.executable, "-m", "vit_jax.benchmark", f"--model={MODEL},no_such_model",
         "--mode=infer,train", "--batch=2", "--warmup=1", "--steps=1", "--repeats=2",
         *(f"--set={k}={v}" for k, v in OVERRIDES.items()),
         f"--json={out_json}", f"--csv={out_csv}", f"--markdown={out_md}"]
  proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  rows = json.loads(out_json.read_text())["rows"]
  assert [(r["model"], r["mode"]) for r in rows] == [
      (MODEL, "infer"), (MODEL, "train"), ("no_such_model", "infer"),
      ("no_such_model", "train")]
  expected_params = models.param_count(MODEL, **OVERRIDES)
  for row in rows[:2]:
    assert row["params"] == expected_params
    for key in ("images_per_s", "step_ms", "fwd_gflops_per_image", "peak_mem_mib"):
      assert row[key] > 0, (key, row)
    assert abs(row["images_per_s"] * row["step_ms"] / 1e3 - 2) < 1e-6  # batch / time
    assert row["mfu"] is None  # CPU: no peak FLOP/s known, none invented
  # The train step counts forward + backward + optimizer: well above the forward.
  assert rows[1]["step_gflops_per_image"] > 2.5 * rows[1]["fwd_gflops_per_image"]
  for row in rows[2:]:
    assert row["images_per_s"] is None and "not registered" in row["note"]

  with open(out_csv) as f:
    assert len(list(csv.DictReader(f))) == 4
  md = out_md.read_text()
  assert md.startswith("# Title") and md.rstrip().endswith("Footer.")
  assert "old table" not in md and f"| {MODEL} | train | 2 |" in md
  assert "skipped: not registered" in md


def test_peak_table():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert benchmark.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert benchmark.peak_tflops("cpu", "float32") is None


def test_vit_b16_forward_flops_match_published():
  """ViT-B/16 at 224: 17.58 GMACs forward (timm/fvcore), i.e. 35.16 GFLOPs; XLA's
  count (which also includes softmax, GELU and LayerNorm) must agree within 5%."""
  gflops = benchmark.forward_gflops_per_image("vit_base_patch16_224")
  assert abs(gflops / (2 * 17.58) - 1) < 0.05, gflops
