"""``python -m vit_jax.tools.data_benchmark``: what it measures, how it reports, its errors."""

import os
import sys

import pytest

from vit_jax.data import benchmark, image_text, tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from test_image_text import write_shards  # noqa: E402  pylint: disable=g-import-not-at-top

PP = "decode|random_resized_crop(6, scale=(0.5, 1.0))|value_range(-1, 1)"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  directory = tmp_path_factory.mktemp("bench")
  shards = write_shards(directory, 2, 20)
  tok = tokenizer.train_bpe([f"caption of s{i}" for i in range(40)], vocab_size=40,
                            context_length=8)
  tok.save(str(directory / "tokenizer.json"))
  return {"shards": shards, "tokenizer": str(directory / "tokenizer.json")}


def test_a_measurement_runs_in_a_pinned_worker_and_stages_add_up(pool):
  spec = benchmark.pipeline_spec(shards=",".join(pool["shards"]),
                                 tokenizer=pool["tokenizer"], context_length=8, pp=PP,
                                 batch_size=8)
  assert spec["kind"] == "image_text" and spec["shards"] == pool["shards"]
  lines = []
  results = benchmark.measure(spec, threads=[1], seconds=0.5, warmup=0.2, repeats=1,
                              stages=False, log=lines.append)
  [run] = results["runs"][("this", 1)]
  assert run["samples_per_s"] > 0 and run["cpu_ms_per_sample"] > 0
  assert run["busy_threads"] >= 1 and run["switches_per_sample"] >= 0
  assert lines[0].startswith("round 1/1: this     1 thread(s):")
  # The stages, measured here (the worker pins itself first; here there is no need).
  stages = benchmark._stages({**spec, "threads": 1})  # pylint: disable=protected-access
  assert list(stages) == ["read", "decode", "augment", "tokenize", "batch"]
  assert all(v >= 0 for v in stages.values()) and stages["decode"] > 0
  results["stages"] = stages
  table = benchmark.report(results, [1])
  assert "| this | 1 |" in table and "stages alone, 1 thread, CPU-ms per sample: read" in table


def test_report_gives_scaling_and_the_baseline_ratio():
  run = lambda rate, load: {"samples_per_s": rate, "cpu_ms_per_sample": 1.0, "load": load}
  results = {"runs": {("this", 1): [run(100, 1.0), run(120, 2.0)],
                      ("this", 2): [run(190, 1.5), run(210, 1.0)],
                      ("baseline", 1): [run(50, 1.0), run(50, 1.0)],
                      ("baseline", 2): [run(55, 1.0), run(65, 1.0)]}}
  table = benchmark.report(results, [1, 2])
  assert "| this | 1 | 110 | 1.00 | - | - | 1.0, 2.0 |" in table
  assert "this: 2 vs 1 thread(s): 1.82x" in table
  assert "this / baseline at 2 thread(s): 3.33x" in table


def test_report_gives_independent_processes_scaling_against_one_thread():
  run = lambda rate, busy: {"samples_per_s": rate, "cpu_ms_per_sample": 2.0, "load": 1.0,
                            "busy_threads": busy, "switches_per_sample": 4.0}
  results = {"runs": {("this", 1): [run(100, 1)], ("this", 2): [run(150, 2)],
                      ("independent", 2): [run(190, 2)]}}
  table = benchmark.report(results, [1, 2])
  assert "| this | 2 | 150 | 2.00 | 2 | 4.0 | 1.0 |" in table
  assert "| independent | 2 processes x 1 | 190 | 2.00 | 2 | 4.0 | 1.0 |" in table
  assert "this: 2 vs 1 thread(s): 1.50x" in table
  assert "independent: 2 vs 1 thread(s): 1.90x" in table


def test_bad_settings_are_one_clear_error(pool, tmp_path):
  with pytest.raises(ValueError, match="need --tokenizer"):
    benchmark.pipeline_spec(shards=pool["shards"][0], pp=PP)
  with pytest.raises(ValueError, match="give --config, --shards with --tokenizer, or "
                     "--dataset"):
    benchmark.pipeline_spec(pp=PP)
  with pytest.raises(image_text.DataError, match="no shards match"):
    benchmark.pipeline_spec(shards=str(tmp_path / "none-*.tar"), tokenizer="t.json", pp=PP)


def test_importing_the_data_package_sizes_tensorflows_intra_op_pool_to_one():
  # tf.data's private threads are the pipelines' parallelism; a per-CPU intra-op pool
  # beside them ran 2K busy threads on K CPUs (README, "Input pipeline speed").
  import vit_jax.data  # pylint: disable=g-import-not-at-top
  assert os.environ["TF_NUM_INTRAOP_THREADS"] == (vit_jax.data.USER_INTRAOP_THREADS or "1")
