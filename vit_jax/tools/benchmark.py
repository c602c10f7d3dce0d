r"""Speed, FLOPs, memory and MFU of the registered models, beside timm.

  python -m vit_jax.tools.benchmark --model=vit_small_patch16_224 --mode=train --batch=8
  python -m vit_jax.tools.benchmark --model=vit_base_patch16_224 --mode=train,infer \
      --batch=256 --dtype=bfloat16 --compare=timm
  python -m vit_jax.tools.benchmark --all --mode=infer --batch=8 --csv=bench.csv
  python -m vit_jax.tools.benchmark --model=vit_small_patch16_224 --batch=8 --quantize=int8

For each model and mode, on the current JAX backend:

* **Timing** follows timm's ``benchmark.py``: synthetic input placed on the device
  once, ``--warmup`` steps after compilation (excluded), then ``--repeats`` repeats of
  ``--steps`` steps each, timed with ``jax.block_until_ready`` at the end of each
  repeat (no host sync inside a repeat); the median repeat is reported as the step
  time and images/s = batch / step time.
* **The train step** is one donated ``jax.jit`` function: forward, softmax
  cross-entropy, backward and an AdamW update (optax), the same work as the timm
  side. Mutable collections (BatchNorm ``batch_stats``) are threaded through.
* **GFLOPs/image** come from XLA's cost analysis of the compiled programs, divided by
  the batch: ``fwd GFLOPs`` is the inference forward pass (a matmul counts 2 FLOPs
  per multiply-add, so ViT-B/16 at 224 is ~35 GFLOPs = 17.6 GMACs); ``step GFLOPs``
  (train mode) is everything XLA counts in the train step (forward, backward,
  optimizer).
* **MFU** = model FLOPs/s over the device's peak: model FLOPs are the forward count
  for inference and 3x it for a train step (backward = 2x forward, the usual
  convention; recomputation and optimizer FLOPs are not model FLOPs). The peak comes
  from ``PEAK_TFLOPS`` by device kind and dtype, or ``--peak_tflops``; unknown
  devices (CPUs) get no MFU.
* **Peak memory**: on GPU/TPU the device allocator's ``peak_bytes_in_use`` (for the
  whole process so far); on CPU, XLA's compiled memory analysis of the timed program
  (arguments + outputs + temporaries - donated aliases).
* **Parameters**: counted on the initialised model (the registry's
  ``models.param_count`` gives the same number).

``--compare=timm`` runs the same architecture (same registry name, which follows
timm) in timm in a worker process (``vit_jax.tools.benchmark_timm``): eager and
``torch.compile``, same batch, same dtype (autocast for bfloat16), same thread count
(``--threads``, default: the CPUs this process may use), on the same device. Its
repeats are interleaved with the JAX repeats (JAX, timm eager, timm compiled, JAX,
...), so a loaded machine slows all of them alike; the ratio ours/timm is printed.

``--quantize=MODE`` (inference; a ``vit_jax.quantization.MODES`` name: int8, fp8, ...)
also times the qwix post-training-quantized model (same weights, dynamic activation
scales), its repeats interleaved with the float ones, and prints the speed ratio
quantized / float: whether the quantized program is faster on this backend, whatever
the answer.

``--model`` takes a comma-separated list; names that are not registered are skipped
with a note (so one table command runs on any checkout, whatever it registers). ``--all``
benchmarks every registered model. ``--csv`` writes every row; ``--markdown``
writes the rows as a Markdown table, or replaces the table between
``<!-- benchmark-table:begin -->`` and ``<!-- benchmark-table:end -->`` in an
existing file (how ``docs/benchmarks.md`` is regenerated). ``--batch`` takes a list
(``--batch=8,32``: every model and mode at each).

timm runs one worker process per variant (eager, compiled). ``torch.compile`` may take
many minutes on a small CPU: ``--compile_timeout_s`` bounds the wait for its warm-up;
past it the worker is killed and the row keeps timm eager only, with a note. Whether
timm has the model at all is asked of timm's registry (``timm.is_model``) in the
worker; a model it lacks gets our numbers alone, with a note.

``--zoo`` benchmarks every registered family: its smallest model (fewest parameters,
counted abstractly with ``models.param_count``; with ``--compare=timm`` the smallest
that timm's registry also has, where the family has one), one row per mode and batch.
``--zoo_part=K/N`` runs the K-th of N contiguous slices of the sorted families, so a
2-core machine can run the zoo in pieces; after every row the part merges its rows
into ``--zoo_json`` (a family it re-measures loses its old rows; other families'
rows stay) and rewrites the block between ``<!-- zoo-table:begin -->`` and
``<!-- zoo-table:end -->`` of ``--markdown`` from that JSON. A model that fails (an
exception, torch.compile past its time, timm lacking it) becomes a row saying why;
the run goes on. Progress (row i/N, elapsed, estimate left) is printed per row.
"""

import ast
import csv
import dataclasses
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from absl import app, flags

FLAGS = flags.FLAGS

# Peak dense TFLOP/s per chip from the vendors' data sheets (no sparsity), matched
# against jax.Device.device_kind in order (first match wins). "float32" on NVIDIA
# GPUs with tensor cores is the TF32 peak: JAX's default matmul precision there
# uses TF32. Where only one figure is known the other is absent (no MFU).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"B200", {"bfloat16": 2250.0, "float32": 1100.0}),
    (r"H200", {"bfloat16": 989.4, "float32": 494.7}),
    (r"H100.*PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    (r"H100", {"bfloat16": 989.4, "float32": 494.7}),  # SXM
    (r"GH200", {"bfloat16": 989.4, "float32": 494.7}),
    (r"A100", {"bfloat16": 312.0, "float32": 156.0}),
    (r"L40S", {"bfloat16": 362.0, "float32": 183.0}),
    (r"L4\b", {"bfloat16": 121.0, "float32": 60.0}),
    (r"RTX 4090", {"bfloat16": 165.2, "float32": 82.6}),
    (r"V100", {"float32": 15.7}),
    (r"TPU v6", {"bfloat16": 918.0}),  # Trillium / v6e
    (r"TPU v5 ?lite|TPU v5e", {"bfloat16": 197.0}),
    (r"TPU v5", {"bfloat16": 459.0}),  # v5p
    (r"TPU v4", {"bfloat16": 275.0}),
    (r"TPU v3", {"bfloat16": 123.0}),
    (r"TPU v2", {"bfloat16": 45.0}),
]

TABLE_BEGIN = "<!-- benchmark-table:begin -->"
TABLE_END = "<!-- benchmark-table:end -->"


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  """The table's peak for a device kind and dtype, or None when unknown."""
  for pattern, peaks in PEAK_TFLOPS:
    if re.search(pattern, device_kind, re.IGNORECASE):
      return peaks.get(dtype)
  return None


@dataclasses.dataclass
class Row:
  model: str
  mode: str
  batch: int
  dtype: str
  family: str = ""
  backend: str = ""
  device: str = ""
  overrides: str = ""
  params: Optional[int] = None
  fwd_gflops_per_image: Optional[float] = None
  step_gflops_per_image: Optional[float] = None
  step_ms: Optional[float] = None
  images_per_s: Optional[float] = None
  step_ms_repeats: str = ""
  peak_mem_mib: Optional[float] = None
  mem_source: str = ""
  mfu: Optional[float] = None
  compile_s: Optional[float] = None
  timm_eager_images_per_s: Optional[float] = None
  timm_compile_images_per_s: Optional[float] = None
  ratio_vs_timm_eager: Optional[float] = None
  ratio_vs_timm_compile: Optional[float] = None
  timm_eager_ms_repeats: str = ""
  timm_compile_ms_repeats: str = ""
  timm_params: Optional[int] = None
  timm_compile_s: Optional[float] = None  # torch.compile + warm-up steps
  quantize: str = ""
  quantized_images_per_s: Optional[float] = None
  quantized_ms_repeats: str = ""
  ratio_quantized_vs_float: Optional[float] = None
  note: str = ""


def _parse_overrides(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set expects KEY=VALUE, got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # a bare string such as dtype names
  return out


class TimmWorker:
  """The timm worker process (see ``vit_jax.tools.benchmark_timm``).

  ``ready_timeout``: seconds to wait for the worker's warm-up (``torch.compile`` can
  take many minutes on a small CPU); past it the worker is killed and TimeoutError
  raised. A reader thread feeds a queue so the wait can time out.
  """

  def __init__(self, spec: dict, ready_timeout: Optional[float] = None):
    # stderr goes to a file: PyTorch's compile warnings could fill a pipe and block.
    self.stderr = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "vit_jax.tools.benchmark_timm", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        text=True, bufsize=1)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._pump, daemon=True).start()
    try:
      self.info = self._read(ready_timeout)
    except TimeoutError:
      self.proc.kill()
      self.proc.wait()
      self.stderr.close()
      raise

  def _pump(self):
    for line in self.proc.stdout:
      if line.startswith("@@"):
        self.lines.put(line)
    self.lines.put(None)  # end of output

  def _read(self, timeout: Optional[float] = None) -> dict:
    try:
      line = self.lines.get(timeout=timeout)
    except queue.Empty:
      raise TimeoutError(f"timm worker not ready in {timeout:.0f} s") from None
    if line is not None:
      return json.loads(line[2:])
    code = self.proc.wait()
    self.stderr.seek(0)
    err = self.stderr.read()
    raise RuntimeError(f"timm worker exited ({code}):\n{err[-3000:]}")

  def time_repeat(self, impl: str) -> float:
    self.proc.stdin.write(impl + "\n")
    self.proc.stdin.flush()
    return self._read()["step_s"]

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    self.stderr.close()


def _memory_mib(compiled) -> Optional[float]:
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**20
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def compiled_flops(compiled) -> Optional[float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def forward_gflops_per_image(name: str, batch: int = 1, **overrides) -> float:
  """XLA's compiled cost analysis of the forward pass, per image (compiled from
  abstract shapes: nothing is allocated, so any model size is cheap to check)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  model = models.create(name, **overrides)
  images = jax.ShapeDtypeStruct(models.input_shape(name, batch=batch, **overrides),
                                jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, images).compile()
  return compiled_flops(compiled) / batch / 1e9


def build_programs(name: str, mode: str, batch: int, overrides: dict):
  """Compiles the timed program of ``mode`` and the forward pass (for FLOPs).

  Returns ``(step, args, compiled_step, compiled_fwd, params_count, compile_s)``;
  ``step(*args)`` returns new args (train: donated state) or the logits (infer).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  model = models.create(name, **overrides)
  shape = models.input_shape(name, batch=batch, **overrides)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.standard_normal(shape, dtype=np.float32))
  num_classes = getattr(model, "num_classes", 1000)
  labels = jax.device_put(rng.integers(0, max(num_classes, 1), (batch,), dtype=np.int32))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      jnp.zeros((1,) + shape[1:], jnp.float32))
  variables = dict(variables)
  variables.pop("intermediates", None)
  params = variables.pop("params")
  model_state = variables  # batch_stats etc.
  params_count = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))

  def forward(params, model_state, images):
    return model.apply({"params": params, **model_state}, images, train=False)

  start = time.perf_counter()
  fwd = jax.jit(forward).lower(params, model_state, images).compile()
  if mode == "infer":
    return fwd, (params, model_state, images), fwd, fwd, params_count, (
        time.perf_counter() - start)

  tx = optax.adamw(1e-4, weight_decay=0.05)
  opt_state = jax.jit(tx.init)(params)
  mutable = list(model_state)

  def train_step(params, opt_state, model_state, images, labels):
    def loss_fn(params):
      out = model.apply({"params": params, **model_state}, images, train=True,
                        rngs={"dropout": jax.random.key(1)},
                        mutable=mutable or False)
      logits, new_state = out if mutable else (out, {})
      if num_classes and isinstance(logits, jax.Array):
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      else:  # features only, or a two-tower model's (image, text, extras): any scalar
        loss = sum(jnp.mean(jnp.square(x)) for x in jax.tree.leaves(logits))
      return loss, new_state

    grads, new_state = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            {**model_state, **new_state}, images, labels)

  args = (params, opt_state, model_state, images, labels)
  # The state (params, optimizer, BatchNorm statistics) is donated: updated in place.
  compiled = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(*args).compile()
  return compiled, args, compiled, fwd, params_count, time.perf_counter() - start


def time_repeat(step, args, mode: str, steps: int):
  """Runs ``steps`` steps; returns (seconds per step, the args to continue with)."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    if mode == "train":
      args = step(*args)
      out = args
    else:
      out = step(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps, args


def benchmark(name: str, mode: str, *, batch: int, dtype: str = "float32",
              attention_impl: Optional[str] = None, overrides: Optional[dict] = None,
              compare: Optional[str] = None, timm_impls=("eager", "compile"),
              warmup: int = 2, steps: int = 3, repeats: int = 5,
              threads: Optional[int] = None,
              peak: Optional[float] = None,
              timm_kwargs: Optional[dict] = None,
              quantize: Optional[str] = None,
              compile_timeout_s: Optional[float] = None) -> Row:
  """Benchmarks one model in one mode; see the module docstring.

  ``timm_kwargs``: with ``overrides``, the ``timm.create_model`` arguments that build
  the same architecture, so that timm is compared (the caller vouches for the match).
  ``quantize``: a quantization mode timed beside the float model (inference only).
  ``compile_timeout_s``: how long timm's ``torch.compile`` (with its warm-up steps)
  may take; past it the row has no compiled timm numbers, and a note says so.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  user_overrides = dict(overrides or {})
  overrides = dict(user_overrides)
  if dtype != "float32":
    overrides["dtype"] = dtype
  if attention_impl:
    overrides["attention_impl"] = attention_impl
  device = jax.devices()[0]
  row = Row(name, mode, batch, dtype, family=models.model_info(name).family,
            backend=jax.default_backend(),
            device=device.device_kind,
            overrides=",".join(f"{k}={v}" for k, v in sorted(overrides.items())))

  step, args, compiled, fwd, row.params, row.compile_s = build_programs(
      name, mode, batch, overrides)
  fwd_flops = compiled_flops(fwd)
  if fwd_flops:
    row.fwd_gflops_per_image = fwd_flops / batch / 1e9
  if mode == "train":
    step_flops = compiled_flops(compiled)
    if step_flops:
      row.step_gflops_per_image = step_flops / batch / 1e9

  quantized = None
  if quantize:
    if mode != "infer":
      raise ValueError(f"--quantize times inference; got mode={mode!r}")
    quantized = _quantized_program(name, overrides, args, quantize)
    row.quantize = quantize

  workers: dict[str, TimmWorker] = {}  # one process per timm variant
  notes = []
  try:
    if compare == "timm":
      if user_overrides and timm_kwargs is None:
        notes.append("timm not compared: model overrides have no timm equivalent")
      elif row.backend not in ("cpu", "gpu"):
        notes.append(f"timm not compared: PyTorch does not run on {row.backend}")
      else:
        image_size = models.input_shape(name, **user_overrides)[1]
        spec = dict(
            model=name, mode=mode, batch=batch, dtype=dtype, image_size=image_size,
            num_classes=getattr(models.create(name, **user_overrides), "num_classes",
                                1000),
            kwargs=timm_kwargs or {},
            threads=threads or len(os.sched_getaffinity(0)),
            warmup=warmup, steps=steps,
            device="cuda" if row.backend == "gpu" else "cpu")
        # Eager first: if timm lacks the model, torch.compile is not tried.
        for impl in sorted(timm_impls, key=lambda i: i != "eager"):
          try:
            worker = TimmWorker({**spec, "impls": [impl]},
                                ready_timeout=compile_timeout_s if impl == "compile"
                                else None)
          except TimeoutError:
            notes.append(f"torch.compile did not finish in {compile_timeout_s:.0f} s")
            continue
          if "error" in worker.info:
            notes.append(worker.info["error"])
            worker.close()
            break
          workers[impl] = worker
          row.timm_params = worker.info["params"]
          if impl == "compile":
            row.timm_compile_s = worker.info["warmup_s"]["compile"]

    for _ in range(warmup):
      _, args = time_repeat(step, args, mode, 1)
    ours, ours_quantized = [], []
    if quantized is not None:
      for _ in range(warmup):
        time_repeat(*quantized, mode, 1)
    theirs = {impl: [] for impl in workers}
    for _ in range(repeats):  # interleaved: ours, timm eager, timm compiled, ours, ...
      seconds, args = time_repeat(step, args, mode, steps)
      ours.append(seconds)
      if quantized is not None:
        ours_quantized.append(time_repeat(*quantized, mode, steps)[0])
      for impl, worker in workers.items():
        theirs[impl].append(worker.time_repeat(impl))
  finally:
    for worker in workers.values():
      worker.close()
  row.note = "; ".join(notes)

  step_s = statistics.median(ours)
  row.step_ms = step_s * 1e3
  row.step_ms_repeats = " ".join(f"{s * 1e3:.1f}" for s in ours)
  row.images_per_s = batch / step_s
  if ours_quantized:
    row.quantized_images_per_s = batch / statistics.median(ours_quantized)
    row.quantized_ms_repeats = " ".join(f"{s * 1e3:.1f}" for s in ours_quantized)
    row.ratio_quantized_vs_float = row.quantized_images_per_s / row.images_per_s
  for impl, times in theirs.items():
    ips = batch / statistics.median(times)
    setattr(row, f"timm_{impl}_ms_repeats", " ".join(f"{t * 1e3:.1f}" for t in times))
    setattr(row, f"timm_{impl}_images_per_s", ips)
    setattr(row, f"ratio_vs_timm_{impl}", row.images_per_s / ips)

  if row.backend == "cpu":
    row.peak_mem_mib, row.mem_source = _memory_mib(compiled), "compiled"
  else:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      row.peak_mem_mib = stats["peak_bytes_in_use"] / 2**20
      row.mem_source = "device peak"
    else:
      row.peak_mem_mib, row.mem_source = _memory_mib(compiled), "compiled"

  peak = peak or peak_tflops(device.device_kind, dtype)
  if peak and row.fwd_gflops_per_image:
    model_gflops = row.fwd_gflops_per_image * (3 if mode == "train" else 1)
    row.mfu = model_gflops * row.images_per_s / (peak * 1e3)
  return row


def _quantized_program(name: str, overrides: dict, args: tuple, mode: str):
  """``(compiled quantized forward, its args)`` for the float program's ``args``."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models, quantization  # pylint: disable=g-import-not-at-top
  params, model_state, images = args
  model = models.create(name, **overrides)
  qmodel, qvariables = quantization.ptq(model, {"params": params, **model_state}, mode,
                                        images[:1])
  compiled = jax.jit(lambda v, x: qmodel.apply(v, x, train=False)).lower(
      qvariables, images).compile()
  return compiled, (qvariables, images)


def _fmt(value, digits=1) -> str:
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:,.{digits}f}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def print_row(row: Row) -> None:
  print(f"\n{row.model}  mode={row.mode}  batch={row.batch}  dtype={row.dtype}  "
        f"{row.backend} ({row.device})" + (f"  [{row.overrides}]" if row.overrides else ""))
  if row.images_per_s is None:
    print(f"  {row.note}")
    return
  print(f"  images/s            {_fmt(row.images_per_s, 2)}")
  print(f"  step time           {_fmt(row.step_ms, 2)} ms  (median of repeats: "
        f"{row.step_ms_repeats} ms)")
  print(f"  GFLOPs/image (fwd)  {_fmt(row.fwd_gflops_per_image, 3)}  (XLA cost analysis)")
  if row.mode == "train":
    print(f"  GFLOPs/image (step) {_fmt(row.step_gflops_per_image, 3)}  "
          "(fwd + bwd + AdamW, XLA cost analysis)")
  print(f"  parameters          {_fmt(row.params)}")
  print(f"  peak memory         {_fmt(row.peak_mem_mib)} MiB ({row.mem_source})")
  print("  MFU                 " + (f"{row.mfu:.1%}" if row.mfu is not None else
                                    "— (peak FLOP/s unknown: --peak_tflops)"))
  print(f"  compile             {_fmt(row.compile_s)} s")
  for impl in ("eager", "compile"):
    ips = getattr(row, f"timm_{impl}_images_per_s")
    if ips is not None:
      ratio = getattr(row, f"ratio_vs_timm_{impl}")
      print(f"  timm {impl:<8}       {_fmt(ips, 2)} images/s  -> ours/timm = {ratio:.2f}x  "
            f"(repeats: {getattr(row, f'timm_{impl}_ms_repeats')} ms)")
  if row.quantized_images_per_s is not None:
    print(f"  {row.quantize:<19} {_fmt(row.quantized_images_per_s, 2)} images/s  -> "
          f"{row.quantize}/float = {row.ratio_quantized_vs_float:.2f}x  (repeats: "
          f"{row.quantized_ms_repeats} ms)")
  if row.note:
    print(f"  note: {row.note}")


def markdown_table(rows: list[Row]) -> str:
  lines = ["| model | mode | batch | dtype | ours img/s | timm eager img/s | "
           "timm compile img/s | ours / eager | ours / compile | fwd GFLOPs/img | "
           "params | peak MiB | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = lambda x: f"{x:.2f}x" if x is not None else "—"
    lines.append(
        f"| {r.model} | {r.mode} | {r.batch} | {r.dtype} | {_fmt(r.images_per_s, 2)} | "
        f"{_fmt(r.timm_eager_images_per_s, 2)} | {_fmt(r.timm_compile_images_per_s, 2)} | "
        f"{ratio(r.ratio_vs_timm_eager)} | {ratio(r.ratio_vs_timm_compile)} | "
        f"{_fmt(r.fwd_gflops_per_image, 2)} | {_fmt(r.params)} | "
        f"{_fmt(r.peak_mem_mib, 0)} | {r.note} |")
  return "\n".join(lines)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name, with its family and model numbers where it has them:
  ratios to timm differ between hosts with the same number of CPUs (matrix-product
  libraries tune per vendor, generation and vector width), and virtual machines
  often name only the vendor ("AMD EPYC" one night ran XLA's products at PyTorch's
  speed, and a Zen 5 under the same name the next at twice it)."""
  fields = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  name = fields.get("model name") or platform.processor() or "unknown"
  if "cpu family" in fields and "model" in fields:
    name += f", family {fields['cpu family']} model {fields['model']}"
  return name


def _machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  load = os.getloadavg()
  return (f"{platform.machine()} CPU ({cpu_model()}), "
          f"{len(os.sched_getaffinity(0))} CPUs usable, JAX {jax.__version__} "
          f"({jax.default_backend()}: {jax.devices()[0].device_kind}); load average at "
          f"the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")


def write_markdown(path: str, rows: list[Row], command: str) -> None:
  table = (f"{TABLE_BEGIN}\n\nCommand: `{command}`\n\nMachine: {_machine()}\n\n"
           f"{markdown_table(rows)}\n\n{TABLE_END}")
  text = open(path).read() if os.path.exists(path) else ""
  if TABLE_BEGIN in text and TABLE_END in text:
    head, rest = text.split(TABLE_BEGIN, 1)
    text = head + table + rest.split(TABLE_END, 1)[1]
  else:
    text = table + "\n"
  with open(path, "w") as f:
    f.write(text)


# ---------------------------------------------------------------------------------
# The whole zoo: one row set per registered family (its smallest model), run in parts.

ZOO_BEGIN = "<!-- zoo-table:begin -->"
ZOO_END = "<!-- zoo-table:end -->"
ZOO_MODE_ORDER = {"train": 0, "infer": 1}


def zoo_families() -> list[str]:
  """Every registered family, sorted (the order parts are cut from)."""
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  return sorted({registry.model_info(n).family for n in registry.list_models()})


def parse_part(part: str) -> tuple[int, int]:
  """``"K/N"`` -> (K, N) with 1 <= K <= N, or a ValueError naming ``--zoo_part``."""
  try:
    k, n = (int(x) for x in part.split("/"))
  except ValueError:
    raise ValueError(f"--zoo_part expects K/N (e.g. 2/5), got {part!r}") from None
  if not 1 <= k <= n:
    raise ValueError(f"--zoo_part={part}: need 1 <= K <= N")
  return k, n


def zoo_part(families: list[str], part: str) -> list[str]:
  """Part K of N: the K-th of N contiguous, near-equal slices of ``families``."""
  k, n = parse_part(part)
  size, extra = divmod(len(families), n)
  start = (k - 1) * size + min(k - 1, extra)
  return families[start:start + size + (1 if k <= extra else 0)]


def smallest_model(family: str, count=None, prefer=None) -> str:
  """The family's model with the fewest parameters (ties: the name first), among
  those in ``prefer`` (e.g. the names timm has) when the family has any.

  ``count(name) -> int`` defaults to ``models.param_count`` (abstract: ``eval_shape``
  of init, nothing allocated).
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  count = count or models.param_count
  names = models.list_models(family=family)
  if not names:
    raise ValueError(f"no registered model of family {family!r}")
  names = [n for n in names if n in (prefer or ())] or names
  return min(names, key=lambda name: (count(name), name))


def timm_known(names: list[str]) -> set[str]:
  """Which of ``names`` timm's registry has, asked of timm in a subprocess (this
  process must not import torch)."""
  out = subprocess.run(
      [sys.executable, "-m", "vit_jax.tools.benchmark_timm", "--known", json.dumps(names)],
      capture_output=True, text=True, check=True, timeout=600).stdout
  line = [l for l in out.splitlines() if l.startswith("@@")][-1]
  return set(json.loads(line[2:])["known"])


def merge_zoo_rows(old: list[dict], new: list[dict]) -> list[dict]:
  """The zoo's rows after a (partial) run: a family the new rows cover loses all its
  old rows (a re-run replaces them); the rest stay. Sorted by family, mode, batch."""
  covered = {r["family"] for r in new}
  rows = [r for r in old if r["family"] not in covered] + list(new)
  return sorted(rows, key=lambda r: (r["family"], r["model"],
                                     ZOO_MODE_ORDER.get(r["mode"], 9), r["batch"]))


def zoo_markdown(store: dict) -> str:
  """The zoo block (between the zoo markers) from the merged JSON store."""
  ratio = lambda x: f"{x:.2f}x" if x is not None else "—"
  lines = [ZOO_BEGIN, ""]
  for part, run in sorted(store.get("runs", {}).items()):
    lines.append(f"- part {part} ({', '.join(run['families'])}): `{run['command']}`; "
                 f"{run['started']} to {run['finished']} ({run['elapsed_s'] / 60:.1f} "
                 f"min, {run['rows_done']}/{run['rows_total']} rows, after "
                 f"{run['select_s'] / 60:.1f} min choosing the models); {run['machine']}")
  lines += ["", "| family | model | params | mode | batch | ours img/s | timm eager img/s | "
            "timm compile img/s | ours / eager | ours / compile | our compile s | "
            "timm compile s | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in store.get("rows", []):
    lines.append(
        f"| {r['family']} | {r['model']} | {_fmt(r['params'])} | {r['mode']} | "
        f"{r['batch']} | {_fmt(r['images_per_s'], 2)} | "
        f"{_fmt(r['timm_eager_images_per_s'], 2)} | "
        f"{_fmt(r['timm_compile_images_per_s'], 2)} | {ratio(r['ratio_vs_timm_eager'])} | "
        f"{ratio(r['ratio_vs_timm_compile'])} | {_fmt(r['compile_s'])} | "
        f"{_fmt(r.get('timm_compile_s'))} | {r['note']} |")
  return "\n".join(lines + ["", ZOO_END])


def write_zoo(json_path: str, markdown_path: Optional[str], rows: list[Row],
              part: str, run: dict) -> dict:
  """Merges ``rows`` into the JSON store and rewrites the zoo block of the markdown."""
  store = {"rows": [], "runs": {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      store = json.load(f)
  store["rows"] = merge_zoo_rows(store["rows"], [dataclasses.asdict(r) for r in rows])
  # A run whose families this part re-measured no longer describes any row.
  store["runs"] = {k: v for k, v in store.get("runs", {}).items()
                   if k == part or not set(v["families"]) <= set(run["families"])}
  store["runs"][part] = run
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path + ".tmp", "w") as f:
    json.dump(store, f, indent=1)
  os.replace(json_path + ".tmp", json_path)  # a killed run leaves the old file whole
  if markdown_path:
    text = open(markdown_path).read() if os.path.exists(markdown_path) else ""
    block = zoo_markdown(store)
    if ZOO_BEGIN in text and ZOO_END in text:
      head, rest = text.split(ZOO_BEGIN, 1)
      text = head + block + rest.split(ZOO_END, 1)[1]
    else:  # never overwrite a page that lacks the markers: append the block
      text = text + ("\n" if text else "") + block + "\n"
    with open(markdown_path, "w") as f:
      f.write(text)
  return store


def _duration(seconds: float) -> str:
  return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 \
      else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so that importing
  this module never clashes with other absl programs' flags such as ``--model``)."""
  flags.DEFINE_list("model", [], "Registered model name(s), comma-separated.")
  flags.DEFINE_bool("all", False, "Benchmark every registered model.")
  flags.DEFINE_bool(
      "zoo", False, "Benchmark every registered family: its smallest model (fewest "
      "parameters). Rows are merged into --zoo_json and the zoo block of --markdown.")
  flags.DEFINE_string("zoo_part", "1/1", "With --zoo: run part K of N (families "
                      "sorted, cut into N contiguous slices), e.g. 2/5.")
  flags.DEFINE_string("zoo_json", "docs/benchmarks_zoo.json", "With --zoo: the JSON "
                      "store every part merges its rows into (a re-run replaces them).")
  flags.DEFINE_float(
      "compile_timeout_s", 600.0, "Longest wait for timm's torch.compile (with its "
      "warm-up steps) per row; past it the row has timm eager only, and with --zoo "
      "larger batches of that model and mode skip torch.compile.")
  flags.DEFINE_list("mode", ["infer"], "infer, train, or both (infer,train).")
  flags.DEFINE_list("batch", ["8"], "Batch size(s) (global, one device), e.g. 8,32.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Compute dtype (parameters stay float32).")
  flags.DEFINE_string(
      "attention_impl", None, "Model override attention_impl (xla|pallas|auto|cudnn) "
      "for models that have it.")
  flags.DEFINE_multi_string(
      "set", [], "Model override KEY=VALUE (Python literal), e.g. --set=num_layers=2. "
      "Rows with overrides are not compared with timm.")
  flags.DEFINE_enum("compare", None, ["timm"], "Also run timm and print ratios.")
  flags.DEFINE_list("timm_impls", ["eager", "compile"],
                    "timm variants for --compare: eager, compile.")
  flags.DEFINE_integer("warmup", 2, "Steps after compilation, not timed.")
  flags.DEFINE_integer("steps", 3, "Steps per timed repeat.")
  flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
  flags.DEFINE_integer(
      "threads", None, "CPU threads for both sides (default: the CPUs this process may "
      "use). JAX: this process is pinned to that many CPUs; PyTorch: set_num_threads.")
  flags.DEFINE_float(
      "peak_tflops", None, "Peak dense TFLOP/s of the device for the chosen dtype "
      "(overrides the built-in table) for MFU.")
  flags.DEFINE_string("csv", None, "Write the rows to this CSV file.")
  flags.DEFINE_string(
      "markdown", None, "Write a Markdown table here (replacing the marked table if "
      "the file has one).")
  flags.DEFINE_string("json", None, "Write the rows (and the machine) as JSON.")
  flags.DEFINE_string("quantize", None, "Also time the qwix-quantized model in this "
                      "mode (int8, fp8, ...; inference) and print quantized/float.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = FLAGS.threads
  if threads:
    # Pin before JAX starts its thread pool: XLA:CPU sizes it by the usable CPUs.
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
      raise app.UsageError(f"--threads={threads} but only {len(cpus)} CPUs are usable")
    os.sched_setaffinity(0, cpus[:threads])
  if FLAGS.compare:
    # timm shares the GPU with this process: JAX must not preallocate most of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  modes = FLAGS.mode
  for mode in modes:
    if mode not in ("infer", "train"):
      raise app.UsageError(f"--mode must be infer, train or both; got {mode!r}")
  try:
    batches = [int(b) for b in FLAGS.batch]
  except ValueError:
    raise app.UsageError(f"--batch expects integers, got {FLAGS.batch}") from None
  command = "python -m vit_jax.tools.benchmark " + " ".join(
      a for a in sys.argv[1:] if not a.startswith(("--markdown", "--csv", "--json")))
  if FLAGS.zoo:
    try:
      families = zoo_part(zoo_families(), FLAGS.zoo_part)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    print(f"zoo part {FLAGS.zoo_part}: {len(families)} families: {', '.join(families)}")
    select_start = time.time()
    # With --compare=timm, each family's smallest model that timm also has (so the
    # row compares), the smallest overall where timm has none of the family.
    prefer = timm_known([n for f in families for n in models.list_models(family=f)]
                        ) if FLAGS.compare == "timm" else None
    names = [smallest_model(f, prefer=prefer) for f in families]  # seconds per model
    select_s = time.time() - select_start
    print(f"smallest of each ({select_s:.0f} s to count every "
          f"model's parameters): " + ", ".join(names))
  else:
    names = models.list_models() if FLAGS.all else FLAGS.model
  if not names:
    raise app.UsageError("give --model=NAME[,NAME...], --all or --zoo")
  overrides = _parse_overrides(FLAGS.set)
  jobs = [(name, mode, batch) for name in names for mode in modes for batch in batches]
  started, start_time = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
  print(f"host: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs usable")
  compile_timed_out = {}  # (name, mode) -> batch: skip torch.compile at larger batches
  rows = []
  for i, (name, mode, batch) in enumerate(jobs):
    if FLAGS.zoo or len(jobs) > 1:
      elapsed = time.time() - start_time
      left = f", about {_duration(elapsed / i * (len(jobs) - i))} left" if i else ""
      # The load matters: under load PyTorch's OpenMP threads lose far more than
      # XLA's pool, so ratios measured on a busy machine are not the quiet ones.
      print(f"\n[{i + 1}/{len(jobs)}] {name} {mode} batch {batch}: elapsed "
            f"{_duration(elapsed)}{left}; load average {os.getloadavg()[0]:.1f} on "
            f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
    timm_impls = list(FLAGS.timm_impls)
    skip_note = ""
    if (name, mode) in compile_timed_out and "compile" in timm_impls:
      timm_impls.remove("compile")
      skip_note = (f"torch.compile not tried: it did not finish in "
                   f"{FLAGS.compile_timeout_s:.0f} s at batch {compile_timed_out[name, mode]}")
    try:
      family = models.model_info(name).family
    except ValueError:
      row = Row(name, mode, batch, FLAGS.dtype,
                note="skipped: not registered in this checkout")
    else:
      try:
        row = benchmark(name, mode, batch=batch, dtype=FLAGS.dtype,
                        attention_impl=FLAGS.attention_impl, overrides=overrides,
                        compare=FLAGS.compare, timm_impls=timm_impls,
                        warmup=FLAGS.warmup, steps=FLAGS.steps,
                        repeats=FLAGS.repeats, threads=threads,
                        peak=FLAGS.peak_tflops, quantize=FLAGS.quantize,
                        compile_timeout_s=FLAGS.compile_timeout_s)
      except Exception as e:  # pylint: disable=broad-except  # one row says why
        if not (FLAGS.all or FLAGS.zoo or len(names) > 1):
          raise
        row = Row(name, mode, batch, FLAGS.dtype, family=family,
                  note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      if "torch.compile did not finish" in row.note:
        compile_timed_out.setdefault((name, mode), batch)
      row.note = "; ".join(n for n in (row.note, skip_note) if n)
    rows.append(row)
    print_row(row)
    sys.stdout.flush()
    if FLAGS.zoo:  # after every row: a killed part keeps what it measured
      write_zoo(FLAGS.zoo_json, FLAGS.markdown, rows, FLAGS.zoo_part, dict(
          families=families, command=command, machine=_machine(), started=started,
          finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          elapsed_s=time.time() - start_time, select_s=select_s, rows_done=len(rows),
          rows_total=len(jobs)))
  if FLAGS.zoo:
    print(f"\nzoo part {FLAGS.zoo_part} done: {len(rows)} rows in "
          f"{_duration(time.time() - start_time)}; merged into {FLAGS.zoo_json}")

  if FLAGS.csv:
    with open(FLAGS.csv, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Row)])
      writer.writeheader()
      for row in rows:
        writer.writerow(dataclasses.asdict(row))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"command": command, "machine": _machine(),
                 "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  if FLAGS.markdown and not FLAGS.zoo:
    write_markdown(FLAGS.markdown, rows, command)


if __name__ == "__main__":
  define_flags()
  app.run(main)
