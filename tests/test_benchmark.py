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

import pytest

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
  # The host is named (ratios to timm differ between CPUs of the same count).
  assert f"({benchmark.cpu_model()})" in md and f"host: {benchmark.cpu_model()}" in proc.stdout


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


# The whole-zoo table (--zoo): selection, parts and merging, on the real registry but
# with a stand-in parameter counter (the name's length; the real one traces every
# model, minutes).


def test_zoo_picks_one_smallest_model_per_family(monkeypatch):
  from vit_jax.models import registry
  families = benchmark.zoo_families()
  assert families == sorted({registry.model_info(n).family for n in models.list_models()})
  counted = []
  monkeypatch.setattr(models, "param_count", lambda n: counted.append(n) or len(n))
  picks = {f: benchmark.smallest_model(f) for f in families}  # default: param_count
  assert sorted(counted) == models.list_models()  # every model counted, none twice
  for family, name in picks.items():
    candidates = models.list_models(family=family)
    assert name == min(candidates, key=lambda n: (len(n), n))
  assert benchmark.smallest_model("tnt", count={"tnt_s_patch16_224": 23_768_584,
                                                "tnt_b_patch16_224": 65_428_680}.get) \
      == "tnt_s_patch16_224"
  # Preferring the names timm has: the smallest of those, else the smallest overall.
  vits = models.list_models(family="vit")
  assert benchmark.smallest_model("vit", count=len, prefer={vits[0], vits[1]}) == min(
      vits[:2], key=lambda n: (len(n), n))
  assert benchmark.smallest_model("tnt", count=len, prefer={"vit_tiny_patch16_224"}) \
      == "tnt_b_patch16_224"  # no tnt preferred: all count; equal length, name first
  with pytest.raises(ValueError, match="no registered model of family 'nope'"):
    benchmark.smallest_model("nope")


def test_zoo_parts_cover_every_family_once():
  families = benchmark.zoo_families()
  for n in (1, 2, 5, 6, len(families), len(families) + 3):
    parts = [benchmark.zoo_part(families, f"{k}/{n}") for k in range(1, n + 1)]
    assert [f for part in parts for f in part] == families  # in order, each once
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
  for bad in ("0/3", "4/3", "3", "a/b"):
    with pytest.raises(ValueError, match="--zoo_part"):
      benchmark.parse_part(bad)


def test_zoo_parts_merge_into_one_markdown_block(tmp_path):
  page, store = tmp_path / "page.md", str(tmp_path / "zoo.json")
  page.write_text(f"# Page\n\n{benchmark.ZOO_BEGIN}\nnot yet run\n{benchmark.ZOO_END}\n"
                  "\nAfter.\n")

  def rows(family, model, ips):
    return [benchmark.Row(model, mode, batch, "float32", family=family, params=10,
                          images_per_s=ips, compile_s=1.0)
            for mode in ("train", "infer") for batch in (8, 32)]

  def run(part, families):
    return dict(families=families, command=f"cmd {part}", machine="m", started="s",
                finished="f", elapsed_s=60.0, select_s=6.0, rows_done=1, rows_total=1)

  benchmark.write_zoo(store, str(page), rows("b_fam", "b1", 1.0), "2/2", run("2/2", ["b_fam"]))
  benchmark.write_zoo(store, str(page), rows("a_fam", "a1", 2.0) + [benchmark.Row(
      "a2", "train", 8, "float32", family="c_fam", note="failed: OOM")], "1/2",
                      run("1/2", ["a_fam", "c_fam"]))
  text = page.read_text()
  assert text.startswith("# Page") and text.rstrip().endswith("After.")
  assert "not yet run" not in text and text.count(benchmark.ZOO_BEGIN) == 1
  table = [l for l in text.splitlines() if l.startswith("| ") and "_fam" in l]
  assert [l.split(" | ")[:5] for l in table][:5] == [
      ["| a_fam", "a1", "10", "train", "8"], ["| a_fam", "a1", "10", "train", "32"],
      ["| a_fam", "a1", "10", "infer", "8"], ["| a_fam", "a1", "10", "infer", "32"],
      ["| b_fam", "b1", "10", "train", "8"]]
  assert len(table) == 9 and "failed: OOM" in table[-1]
  assert "`cmd 1/2`" in text and "`cmd 2/2`" in text
  # A re-run of part 2 replaces its family's rows (here: batch 8 only, new numbers).
  benchmark.write_zoo(store, str(page), rows("b_fam", "b1", 5.0)[:1], "2/2",
                      run("2/2", ["b_fam"]))
  stored = json.load(open(store))["rows"]
  assert [(r["model"], r["images_per_s"]) for r in stored if r["family"] == "b_fam"] == [
      ("b1", 5.0)]
  assert len(stored) == 6


def test_train_step_of_a_two_tower_model():
  """The zoo's two-tower row: a model whose output is (image, text, extras), not logits,
  still gets a train step (it failed with a TypeError in the first whole-zoo run)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  step, args, *_ = benchmark.build_programs(
      "clip_vit_base_patch32_224", "train", 2,
      {"image": {"num_layers": 1}, "text": {"num_layers": 1}})
  before = jax.tree.map(np.asarray, args[0])  # the step donates its state
  after = jax.tree.map(np.asarray, step(*args)[0])
  changed = [bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(after),
                                                  jax.tree.leaves(before))]
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(after))
  assert sum(changed) > len(changed) // 2


def test_cpu_model_names_family_and_model_where_cpuinfo_has_them(tmp_path):
  # Two processors' blocks: the first one is read.
  block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx512f\n\n")
  info = tmp_path / "cpuinfo"
  info.write_text(block.format(n=0) + block.format(n=1).replace("26", "25"))
  assert benchmark.cpu_model(str(info)) == "AMD EPYC, family 26 model 2"
  # Without family numbers (e.g. ARM's cpuinfo), the name alone.
  info.write_text("processor\t: 0\nmodel name\t: Neoverse-V2\n\n")
  assert benchmark.cpu_model(str(info)) == "Neoverse-V2"
