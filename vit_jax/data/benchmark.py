"""Measuring input pipelines: samples/s per process at 1..K CPUs, and each stage alone.

The command is ``python -m vit_jax.tools.data_benchmark`` (``python -m
vit_jax.data.benchmark`` runs it too); its docstring says what is measured and how.
Here: ``pipeline_spec`` (what to build), ``measure`` (interleaved runs of workers, one
process each), ``report`` (the table) and ``worker`` (one measurement). A worker may
run against another checkout of vit_jax (``--baseline``), so this module imports
vit_jax only inside functions, and drives an image-text reader that decodes in its own
threads (``ImageTextStream(decode_threads=...)``) as that tree's trainer did.
"""

import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

_STAGE_SAMPLES = 256

THIS_FILE = os.path.abspath(__file__)
THIS_TREE = os.path.dirname(os.path.dirname(os.path.dirname(THIS_FILE)))
# The thread count configs/clip_datacomp.py gave a reader that decodes in its threads.
READER_DECODE_THREADS = 8


# ---------------------------------------------------------------- worker (any tree)

def _pin(threads: int, first: int = 0) -> None:
  cpus = sorted(os.sched_getaffinity(0))
  if first + threads > len(cpus):
    raise ValueError(f"threads={threads} from CPU {first} but only {len(cpus)} CPUs are "
                     "usable")
  os.sched_setaffinity(0, cpus[first:first + threads])


def _thread_cpu_ticks() -> dict[str, int]:
  """CPU ticks (user + system) of each of this process's threads so far (Linux)."""
  ticks = {}
  for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # the thread ended
      continue
    ticks[tid] = int(fields[11]) + int(fields[12])
  return ticks


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
  import resource  # pylint: disable=g-import-not-at-top
  switches = lambda: (lambda r: r.ru_nvcsw + r.ru_nivcsw)(
      resource.getrusage(resource.RUSAGE_SELF))
  ticks0 = _thread_cpu_ticks()
  samples, cpu0, t0, sw0 = 0, time.process_time(), time.perf_counter(), switches()
  while time.perf_counter() - t0 < spec["seconds"]:
    samples += size(next(batches))
  elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  result = {"samples_per_s": samples / elapsed, "cpu_ms_per_sample": 1e3 * cpu / samples,
            "switches_per_sample": (switches() - sw0) / samples,
            "load": os.getloadavg()[0]}
  used = [t - ticks0.get(tid, 0) for tid, t in _thread_cpu_ticks().items()]
  if sum(used) > 0:
    # Threads that did at least a tenth of the work: more than the pinned CPUs means
    # the pipeline's threads queue for them.
    result["busy_threads"] = sum(u >= 0.1 * sum(used) for u in used)
  return result


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
  _pin(spec["threads"], spec.get("first_cpu", 0))
  result = _stages(spec) if spec.get("stages") else _throughput(spec)
  print("RESULT " + json.dumps(result), flush=True)
  os._exit(0)  # tf.data's reading threads need not be joined


# ---------------------------------------------------------------- driver

def _start(tree: str, spec: dict) -> subprocess.Popen:
  code = ("import importlib.util, sys\n"
          f"spec = importlib.util.spec_from_file_location('data_benchmark', {THIS_FILE!r})\n"
          "module = importlib.util.module_from_spec(spec)\n"
          "spec.loader.exec_module(module)\n"
          "module.worker(sys.argv[1])\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [tree] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
             TF_CPP_MIN_LOG_LEVEL="2")
  # Importing vit_jax.data here set TensorFlow's intra-op threads; a baseline tree
  # gets the user's setting, not this tree's.
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  env.pop("TF_NUM_INTRAOP_THREADS", None)
  if data.USER_INTRAOP_THREADS is not None:
    env["TF_NUM_INTRAOP_THREADS"] = data.USER_INTRAOP_THREADS
  # -P: without it `python -c` puts the working directory first on the path, and run
  # from a checkout, the baseline's worker would import that checkout's vit_jax.
  return subprocess.Popen([sys.executable, "-P", "-c", code, json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(tree: str, proc: subprocess.Popen) -> dict:
  stdout, stderr = proc.communicate()
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"the measurement in {tree} failed ({proc.returncode}):\n"
                       f"{stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _run(tree: str, spec: dict) -> dict:
  return _result(tree, _start(tree, spec))


def _independent(spec: dict, n: int) -> dict:
  """``n`` one-thread workers at once, each pinned to its own CPU: the machine's own
  scaling for this pipeline, with no thread of one process waiting on another's."""
  procs = [_start(THIS_TREE, {**spec, "threads": 1, "first_cpu": i}) for i in range(n)]
  results = [_result(THIS_TREE, p) for p in procs]
  return {"samples_per_s": sum(r["samples_per_s"] for r in results),
          **{k: statistics.mean(r[k] for r in results)
             for k in ("cpu_ms_per_sample", "switches_per_sample") if k in results[0]},
          "busy_threads": sum(r.get("busy_threads", 0) for r in results),
          "load": max(r["load"] for r in results)}


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
    raise ValueError("give --pp or a --config with input.pp_train")
  if shards:
    from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
    if not tokenizer:
      raise ValueError("image-text shards need --tokenizer (or the config's "
                           "tokenizer.path)")
    spec.setdefault("shards_per_window", 2)
    return {**spec, "kind": "image_text", "shards": image_text.expand_shards(shards),
            "tokenizer": tokenizer, "context_length": context_length}
  if dataset:
    return {**spec, "kind": "classification", "dataset": dataset, "data_dir": data_dir,
            "split": split}
  raise ValueError("give --config, --shards with --tokenizer, or --dataset")


def measure(spec: dict, *, threads: list[int], seconds: float, warmup: float,
            repeats: int, baseline: Optional[str] = None, stages: bool = True,
            independent: bool = False, log=print) -> dict:
  """Interleaved measurements: ``{"runs": {(tree name, threads): [results]}, "stages"}``.

  ``independent``: also, for each thread count K > 1, K one-thread processes of this
  tree at once, pinned apart (tree name ``independent``).
  """
  trees = [("this", THIS_TREE)] + ([("baseline", os.path.abspath(baseline))]
                                   if baseline else [])
  runs = {}
  for round_ in range(repeats):
    for n in threads:
      measured = [(name, lambda tree=tree: _run(
          tree, {**spec, "threads": n, "seconds": seconds, "warmup": warmup}))
                  for name, tree in trees]
      if independent and n > 1:
        measured.append(("independent", lambda: _independent(
            {**spec, "seconds": seconds, "warmup": warmup}, n)))
      for name, run in measured:
        result = run()
        runs.setdefault((name, n), []).append(result)
        log(f"round {round_ + 1}/{repeats}: {name:8s} {n} thread(s): "
            f"{result['samples_per_s']:8.1f} samples/s, "
            f"{result['cpu_ms_per_sample']:.2f} CPU-ms/sample, "
            f"{result.get('busy_threads', '?')} busy thread(s) (load {result['load']:.2f})")
  out = {"runs": runs}
  if stages:
    out["stages"] = _run(THIS_TREE, {**spec, "threads": 1, "stages": True})
  return out


def report(results: dict, threads: list[int]) -> str:
  runs = results["runs"]
  median = lambda key, field: statistics.median(r[field] for r in runs[key])

  def optional(key, field, form):
    values = [r[field] for r in runs[key] if field in r]
    return form.format(statistics.median(values)) if values else "-"

  lines = ["| pipeline | threads | samples/s (median) | CPU-ms/sample | busy threads | "
           "context switches/sample | load (1 min) |", "|---|---|---|---|---|---|---|"]
  order = {"this": 0, "independent": 1, "baseline": 2}
  for (name, n) in sorted(runs, key=lambda k: (order.get(k[0], 3), k[1])):
    loads = ", ".join(f"{r['load']:.1f}" for r in runs[(name, n)])
    label = f"{n} processes x 1" if name == "independent" else str(n)
    lines.append(f"| {name} | {label} | {median((name, n), 'samples_per_s'):.0f} | "
                 f"{median((name, n), 'cpu_ms_per_sample'):.2f} | "
                 f"{optional((name, n), 'busy_threads', '{:g}')} | "
                 f"{optional((name, n), 'switches_per_sample', '{:.1f}')} | {loads} |")
  names = sorted({name for name, _ in runs}, key=lambda k: order.get(k, 3))
  lo, hi = min(threads), max(threads)
  for name in names:
    base = "this" if name == "independent" else name
    if hi > lo and (name, hi) in runs and (base, lo) in runs:
      lines.append(f"\n{name}: {hi} vs {lo} thread(s): "
                   f"{median((name, hi), 'samples_per_s') / median((base, lo), 'samples_per_s'):.2f}x")
  if "baseline" in names:
    for n in threads:
      lines.append(f"this / baseline at {n} thread(s): "
                   f"{median(('this', n), 'samples_per_s') / median(('baseline', n), 'samples_per_s'):.2f}x")
  if "stages" in results:
    stages = results["stages"]
    lines.append("\nstages alone, 1 thread, CPU-ms per sample: " + ", ".join(
        f"{k} {v:.2f}" for k, v in stages.items()) + f" (sum {sum(stages.values()):.2f})")
  return "\n".join(lines)


if __name__ == "__main__":  # the command line lives in vit_jax/tools
  runpy.run_module("vit_jax.tools.data_benchmark", run_name="__main__", alter_sys=True)
