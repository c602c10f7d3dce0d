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
existing file (how ``docs/benchmarks.md`` is regenerated).
"""

import ast
import csv
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
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
  """The timm worker process (see ``vit_jax.tools.benchmark_timm``)."""

  def __init__(self, spec: dict):
    # stderr goes to a file: PyTorch's compile warnings could fill a pipe and block.
    self.stderr = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "vit_jax.tools.benchmark_timm", json.dumps(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        text=True, bufsize=1)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("@@"):
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
      if num_classes:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      else:  # a features-only model: any scalar of the output
        loss = jnp.mean(jnp.square(logits))
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
              quantize: Optional[str] = None) -> Row:
  """Benchmarks one model in one mode; see the module docstring.

  ``timm_kwargs``: with ``overrides``, the ``timm.create_model`` arguments that build
  the same architecture, so that timm is compared (the caller vouches for the match).
  ``quantize``: a quantization mode timed beside the float model (inference only).
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
  row = Row(name, mode, batch, dtype, backend=jax.default_backend(),
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

  worker = None
  if compare == "timm":
    if user_overrides and timm_kwargs is None:
      row.note = "timm not compared: model overrides have no timm equivalent"
    elif row.backend not in ("cpu", "gpu"):
      row.note = f"timm not compared: PyTorch does not run on {row.backend}"
    else:
      image_size = models.input_shape(name, **user_overrides)[1]
      worker = TimmWorker(dict(
          model=name, mode=mode, batch=batch, dtype=dtype, image_size=image_size,
          num_classes=getattr(models.create(name, **user_overrides), "num_classes", 1000),
          kwargs=timm_kwargs or {},
          threads=threads or len(os.sched_getaffinity(0)), impls=list(timm_impls),
          warmup=warmup, steps=steps,
          device="cuda" if row.backend == "gpu" else "cpu"))
      if "error" in worker.info:
        row.note = worker.info["error"]
        worker.close()
        worker = None
      else:
        row.timm_params = worker.info["params"]

  try:
    for _ in range(warmup):
      _, args = time_repeat(step, args, mode, 1)
    ours, ours_quantized = [], []
    if quantized is not None:
      for _ in range(warmup):
        time_repeat(*quantized, mode, 1)
    theirs = {impl: [] for impl in timm_impls}
    for _ in range(repeats):  # interleaved: ours, timm eager, timm compiled, ours, ...
      seconds, args = time_repeat(step, args, mode, steps)
      ours.append(seconds)
      if quantized is not None:
        ours_quantized.append(time_repeat(*quantized, mode, steps)[0])
      if worker is not None:
        for impl in timm_impls:
          theirs[impl].append(worker.time_repeat(impl))
  finally:
    if worker is not None:
      worker.close()

  step_s = statistics.median(ours)
  row.step_ms = step_s * 1e3
  row.step_ms_repeats = " ".join(f"{s * 1e3:.1f}" for s in ours)
  row.images_per_s = batch / step_s
  if ours_quantized:
    row.quantized_images_per_s = batch / statistics.median(ours_quantized)
    row.quantized_ms_repeats = " ".join(f"{s * 1e3:.1f}" for s in ours_quantized)
    row.ratio_quantized_vs_float = row.quantized_images_per_s / row.images_per_s
  if worker is not None:
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


def _machine() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  load = os.getloadavg()
  return (f"{platform.machine()} CPU, "
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


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so that importing
  this module never clashes with other absl programs' flags such as ``--model``)."""
  flags.DEFINE_list("model", [], "Registered model name(s), comma-separated.")
  flags.DEFINE_bool("all", False, "Benchmark every registered model.")
  flags.DEFINE_list("mode", ["infer"], "infer, train, or both (infer,train).")
  flags.DEFINE_integer("batch", 8, "Batch size (global, one device).")
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
  names = models.list_models() if FLAGS.all else FLAGS.model
  if not names:
    raise app.UsageError("give --model=NAME[,NAME...] or --all")
  overrides = _parse_overrides(FLAGS.set)
  rows = []
  for name in names:
    for mode in modes:
      try:
        models.model_info(name)
      except ValueError:
        row = Row(name, mode, FLAGS.batch, FLAGS.dtype,
                  note="skipped: not registered in this checkout")
      else:
        try:
          row = benchmark(name, mode, batch=FLAGS.batch, dtype=FLAGS.dtype,
                          attention_impl=FLAGS.attention_impl, overrides=overrides,
                          compare=FLAGS.compare, timm_impls=FLAGS.timm_impls,
                          warmup=FLAGS.warmup, steps=FLAGS.steps,
                          repeats=FLAGS.repeats, threads=threads,
                          peak=FLAGS.peak_tflops, quantize=FLAGS.quantize)
        except Exception as e:  # pylint: disable=broad-except
          if not (FLAGS.all or len(names) > 1):
            raise
          row = Row(name, mode, FLAGS.batch, FLAGS.dtype,
                    note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      rows.append(row)
      print_row(row)
      sys.stdout.flush()

  command = "python -m vit_jax.tools.benchmark " + " ".join(
      a for a in sys.argv[1:] if not a.startswith(("--markdown", "--csv", "--json")))
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
  if FLAGS.markdown:
    write_markdown(FLAGS.markdown, rows, command)


if __name__ == "__main__":
  define_flags()
  app.run(main)
