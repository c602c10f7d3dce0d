r"""Samples/s of an input pipeline, per process, at 1..K CPU threads, and its stages.

  python -m vit_jax.data.benchmark --config=configs/clip_datacomp.py \
      --config.input.train_shards='pool256/train' \
      --config.tokenizer.path=pool256/tokenizer.json --threads=1,2 --seconds=20
  python -m vit_jax.data.benchmark --shards='pool/*.tar' --tokenizer=pool/tokenizer.json \
      --pp='decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)'
  python -m vit_jax.data.benchmark --dataset=digit_scenes \
      --pp='decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)'

The pipeline is a config's input section (``--config``: image-text shards for the
contrastive trainer, a TFDS dataset for classification) or given by flags
(``--shards`` + ``--tokenizer``, or ``--dataset``; ``--pp`` overrides the config's
``pp_train``). Every measurement runs in a fresh worker process pinned to ``threads``
CPUs (``os.sched_setaffinity``) with ``threads`` tf.data threads: it builds the
training pipeline the trainer builds, drops ``--warmup`` seconds, then counts the
samples of the batches it receives in ``--seconds`` seconds, and the CPU time they
took. Measurements are interleaved (``--repeats`` rounds over the thread counts, each
round this tree then the baseline), so a shared machine's load hits them alike; the
table gives the median and the 1-minute load average seen by each.

``--baseline=DIR`` measures the pipeline of another checkout of vit_jax (e.g. a
``git worktree`` of main) the same way, in the same rounds. The worker runs with that
tree first on the path; it recognises an image-text reader that decodes in its own
threads (``ImageTextStream(decode_threads=...)``) and drives it as that tree's
trainer did.

``--stages`` (default on) then measures, on one thread, the CPU time per sample of
each stage alone on cached inputs: read (the shard reader, or the records read by
index), decode, augment (the rest of the pp string), tokenize (image-text) and batch
(stacking a batch and handing it to numpy). The stages of a healthy pipeline add up
to about its 1-thread CPU time per sample.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A training config whose input section is measured.",
    lock_config=False)
_SHARDS = flags.DEFINE_string("shards", None, "Image-text shards (glob, brace range, "
                              "directory or comma list).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json for --shards.")
_CONTEXT = flags.DEFINE_integer("context_length", 77, "Tokens per caption (--shards).")
_DATASET = flags.DEFINE_string("dataset", None, "A TFDS dataset (classification input).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir for --dataset.")
_SPLIT = flags.DEFINE_string("split", "train", "Split of --dataset.")
_PP = flags.DEFINE_string("pp", None, "Preprocessing (default: the config's pp_train).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Per-process batch.")
_THREADS = flags.DEFINE_list("threads", None, "CPU thread counts to measure "
                             "(default: 1 up to the CPUs this process may use).")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Measured seconds per run.")
_WARMUP = flags.DEFINE_float("warmup", 5.0, "Seconds dropped before measuring.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Interleaved rounds.")
_BASELINE = flags.DEFINE_string("baseline", None, "Another vit_jax checkout to measure "
                                "in the same rounds.")
_STAGES = flags.DEFINE_bool("stages", True, "Also measure each stage alone.")
_STAGE_SAMPLES = 256

THIS_FILE = os.path.abspath(__file__)
THIS_TREE = os.path.dirname(os.path.dirname(os.path.dirname(THIS_FILE)))
# The thread count configs/clip_datacomp.py gave a reader that decodes in its threads.
READER_DECODE_THREADS = 8


# ---------------------------------------------------------------- worker (any tree)

def _pin(threads: int) -> None:
  cpus = sorted(os.sched_getaffinity(0))
  if threads > len(cpus):
    raise ValueError(f"threads={threads} but only {len(cpus)} CPUs are usable")
  os.sched_setaffinity(0, cpus[:threads])


def _image_text_batches(spec: dict):
  """The contrastive trainer's batches (per process) for ``spec``."""
  import inspect  # pylint: disable=g-import-not-at-top
  from vit_jax.data import image_text, preprocess, tokenizer  # pylint: disable=g-import-not-at-top
  tok = tokenizer.Tokenizer.load(spec["tokenizer"], context_length=spec["context_length"])
  pp = preprocess.parse(spec["pp"])
  kwargs = dict(seed=spec["seed"], shards_per_window=spec["shards_per_window"])
  if "decode_threads" in inspect.signature(image_text.ImageTextStream).parameters:
    stream = image_text.ImageTextStream(spec["shards"], decode_threads=READER_DECODE_THREADS,
                                        **kwargs)
    return image_text.make_train_dataset(stream, tokenizer=tok, preprocess_fn=pp,
                                         batch_size=spec["batch_size"]).as_numpy_iterator()
  stream = image_text.ImageTextStream(spec["shards"], **kwargs)
  return iter(image_text.TrainData(stream, tokenizer=tok, preprocess_fn=pp,
                                   batch_size=spec["batch_size"], threads=spec["threads"]))


def _classification_batches(spec: dict):
  import inspect  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.get_builder(spec["dataset"], spec["data_dir"])
  kwargs = {}
  if "threads" in inspect.signature(input_pipeline.make_train_dataset).parameters:
    kwargs["threads"] = spec["threads"]
  ds = input_pipeline.make_train_dataset(
      builder, spec["split"], preprocess_fn=preprocess.parse(spec["pp"]),
      batch_size=spec["batch_size"], seed=spec["seed"], **kwargs)
  return ds.as_numpy_iterator()


def _throughput(spec: dict) -> dict:
  make = _image_text_batches if spec["kind"] == "image_text" else _classification_batches
  batches = make(spec)
  size = lambda batch: len(next(iter(batch.values())))
  started = time.perf_counter()
  while time.perf_counter() - started < spec["warmup"]:
    next(batches)
  samples, cpu0, t0 = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - t0 < spec["seconds"]:
    samples += size(next(batches))
  elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  return {"samples_per_s": samples / elapsed, "cpu_ms_per_sample": 1e3 * cpu / samples,
          "load": os.getloadavg()[0]}


def _cpu_per_sample(ds, count: int) -> float:
  """CPU seconds per element to iterate ``ds`` to its end."""
  cpu0 = time.process_time()
  for _ in ds.as_numpy_iterator():
    pass
  return (time.process_time() - cpu0) / count


def _stages(spec: dict) -> dict[str, float]:
  """CPU-ms per sample of each stage alone, on one thread, on cached inputs."""
  import itertools  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  n, options = _STAGE_SAMPLES, input_pipeline.dataset_options(1)
  pp = preprocess.parse(spec["pp"])
  cost = {}
  cpu0 = time.process_time()
  if spec["kind"] == "image_text":
    from vit_jax.data import image_text, tokenizer  # pylint: disable=g-import-not-at-top
    stream = image_text.ImageTextStream(spec["shards"], seed=spec["seed"],
                                        shards_per_window=spec["shards_per_window"])
    samples = [s for s, _ in itertools.islice(stream, n)]
    cost["read"] = (time.process_time() - cpu0) / n
    encoded = [s["image_bytes"] for s in samples]
    captions = [s["caption"] for s in samples]
    tok = tokenizer.Tokenizer.load(spec["tokenizer"], context_length=spec["context_length"])
    deserialize = lambda x: x
  else:
    builder = input_pipeline.get_builder(spec["dataset"], spec["data_dir"])
    source = input_pipeline.record_source(builder, spec["split"])
    order = np.random.default_rng(0).permutation(len(source))[:n]
    encoded = [r for i in range(0, n, 64) for r in input_pipeline._read(source, order[i:i + 64])]  # pylint: disable=protected-access
    cost["read"] = (time.process_time() - cpu0) / n
    features = builder.info.features
    deserialize = lambda r: features.deserialize_example(
        r, decoders={"image": tfds.decode.SkipDecoding()})["image"]

  def timed(base, stage):
    """Cost of ``stage`` over ``base`` (a cached dataset), less iterating ``base``."""
    base = base.with_options(options)
    return max(_cpu_per_sample(stage(base).with_options(options), n) -
               _cpu_per_sample(base, n), 0.0)

  raw = tf.data.Dataset.from_tensor_slices(encoded).cache()
  _cpu_per_sample(raw, n)  # fills the cache
  decode = lambda ds: ds.map(lambda r: tf.io.decode_image(
      deserialize(r), channels=3, expand_animations=False))
  cost["decode"] = timed(raw, decode)
  decoded = decode(raw).cache()
  _cpu_per_sample(decoded, n)
  seeds = tf.data.Dataset.from_tensor_slices(np.arange(2 * n).reshape(n, 2))
  augment = lambda ds: tf.data.Dataset.zip(ds, seeds).map(
      lambda image, rng: pp({"image": image, "_rng": rng})["image"])
  cost["augment"] = timed(decoded, augment)
  if spec["kind"] == "image_text":
    texts = tf.data.Dataset.from_tensor_slices(captions).batch(spec["batch_size"]).cache()
    _cpu_per_sample(texts, n)
    cost["tokenize"] = timed(texts, lambda ds: ds.map(tok.encode_tf))
  augmented = augment(decoded).cache()
  _cpu_per_sample(augmented, n)
  cost["batch"] = timed(augmented, lambda ds: ds.batch(spec["batch_size"]))
  return {k: 1e3 * v for k, v in cost.items()}


def worker(spec_json: str) -> None:
  """Runs one measurement in this process and prints it as one JSON line."""
  spec = json.loads(spec_json)
  _pin(spec["threads"])
  result = _stages(spec) if spec.get("stages") else _throughput(spec)
  print("RESULT " + json.dumps(result), flush=True)
  os._exit(0)  # tf.data's reading threads need not be joined


# ---------------------------------------------------------------- driver

def _run(tree: str, spec: dict) -> dict:
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('data_benchmark', {THIS_FILE!r})\n"
          "module = importlib.util.module_from_spec(spec)\n"
          "spec.loader.exec_module(module)\n"
          "module.worker(sys.argv[1])\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [tree] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                        capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"the measurement in {tree} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def pipeline_spec(config=None, *, shards: Optional[str] = None,
                  tokenizer: Optional[str] = None, context_length: int = 77,
                  dataset: Optional[str] = None, data_dir: Optional[str] = None,
                  split: str = "train", pp: Optional[str] = None,
                  batch_size: int = 256) -> dict[str, Any]:
  """What a worker builds: from a config's input section, overridden by the arguments."""
  spec = {"batch_size": batch_size, "seed": 0, "pp": pp}
  if config is not None:
    spec["seed"] = config.get("seed", 0)
    spec["pp"] = pp or config.input.pp_train
    if config.get("trainer") == "contrastive":
      shards = shards or config.input.train_shards
      tokenizer = tokenizer or config.tokenizer.path
      context_length = config.tokenizer.context_length
      spec["shards_per_window"] = config.input.shards_per_window
    else:
      dataset, data_dir = dataset or config.input.dataset, data_dir or config.input.data_dir
      split = config.input.get("train_split", split)
  if not spec["pp"]:
    raise app.UsageError("give --pp or a --config with input.pp_train")
  if shards:
    from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
    if not tokenizer:
      raise app.UsageError("image-text shards need --tokenizer (or the config's "
                           "tokenizer.path)")
    spec.setdefault("shards_per_window", 2)
    return {**spec, "kind": "image_text", "shards": image_text.expand_shards(shards),
            "tokenizer": tokenizer, "context_length": context_length}
  if dataset:
    return {**spec, "kind": "classification", "dataset": dataset, "data_dir": data_dir,
            "split": split}
  raise app.UsageError("give --config, --shards with --tokenizer, or --dataset")


def measure(spec: dict, *, threads: list[int], seconds: float, warmup: float,
            repeats: int, baseline: Optional[str] = None, stages: bool = True,
            log=print) -> dict:
  """Interleaved measurements: ``{"runs": {(tree name, threads): [results]}, "stages"}``."""
  trees = [("this", THIS_TREE)] + ([("baseline", os.path.abspath(baseline))]
                                   if baseline else [])
  runs = {}
  for round_ in range(repeats):
    for n in threads:
      for name, tree in trees:
        result = _run(tree, {**spec, "threads": n, "seconds": seconds, "warmup": warmup})
        runs.setdefault((name, n), []).append(result)
        log(f"round {round_ + 1}/{repeats}: {name:8s} {n} thread(s): "
            f"{result['samples_per_s']:8.1f} samples/s, "
            f"{result['cpu_ms_per_sample']:.2f} CPU-ms/sample (load {result['load']:.2f})")
  out = {"runs": runs}
  if stages:
    out["stages"] = _run(THIS_TREE, {**spec, "threads": 1, "stages": True})
  return out


def report(results: dict, threads: list[int]) -> str:
  runs = results["runs"]
  median = lambda key, field: statistics.median(r[field] for r in runs[key])
  lines = ["| pipeline | threads | samples/s (median) | CPU-ms/sample | load (1 min) |",
           "|---|---|---|---|---|"]
  for (name, n) in sorted(runs, key=lambda k: (k[0] != "this", k[1])):
    loads = ", ".join(f"{r['load']:.1f}" for r in runs[(name, n)])
    lines.append(f"| {name} | {n} | {median((name, n), 'samples_per_s'):.0f} | "
                 f"{median((name, n), 'cpu_ms_per_sample'):.2f} | {loads} |")
  names = sorted({name for name, _ in runs})
  lo, hi = min(threads), max(threads)
  for name in names:
    if hi > lo:
      lines.append(f"\n{name}: {hi} vs {lo} thread(s): "
                   f"{median((name, hi), 'samples_per_s') / median((name, lo), 'samples_per_s'):.2f}x")
  if "baseline" in names:
    for n in threads:
      lines.append(f"this / baseline at {n} thread(s): "
                   f"{median(('this', n), 'samples_per_s') / median(('baseline', n), 'samples_per_s'):.2f}x")
  if "stages" in results:
    stages = results["stages"]
    lines.append("\nstages alone, 1 thread, CPU-ms per sample: " + ", ".join(
        f"{k} {v:.2f}" for k, v in stages.items()) + f" (sum {sum(stages.values()):.2f})")
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  spec = pipeline_spec(_CONFIG.value, shards=_SHARDS.value, tokenizer=_TOKENIZER.value,
                       context_length=_CONTEXT.value, dataset=_DATASET.value,
                       data_dir=_DATA_DIR.value, split=_SPLIT.value, pp=_PP.value,
                       batch_size=_BATCH.value)
  usable = len(os.sched_getaffinity(0))
  threads = [int(t) for t in _THREADS.value] if _THREADS.value else list(
      range(1, usable + 1))
  if max(threads) > usable or min(threads) < 1:
    raise app.UsageError(f"--threads={','.join(map(str, threads))}: use 1 to {usable} "
                         "(the CPUs this process may use)")
  results = measure(spec, threads=threads, seconds=_SECONDS.value, warmup=_WARMUP.value,
                    repeats=_REPEATS.value, baseline=_BASELINE.value, stages=_STAGES.value)
  print(report(results, threads))


if __name__ == "__main__":
  app.run(main)
