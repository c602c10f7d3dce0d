"""Times the attention implementations: ``python -m vit_jax.kernels.bench``.

For each operation (global softmax attention, linear attention, block/grid window
attention) and each implementation, forward and forward+backward:

- time: median wall time of ``--repeats`` runs of the jitted, compiled function
  (after one warm-up run);
- FLOP/s: model FLOPs / time. Model FLOPs are the matmuls of the math, counted the
  same way for every implementation: softmax attention ``4 B H N^2 D``, linear
  attention ``4 B H N D E``, windows ``4 B (H W) heads P D``; forward+backward
  counts 3x the forward (no recomputation);
- GB/s: the minimum memory traffic (read q, k, v, write o; the backward pass adds
  reading o, do and writing dq, dk, dv) / time. Window attention is memory-bound:
  this column is its figure of merit;
- peak memory: XLA's compiled memory analysis, arguments + outputs + temporaries
  (``temp`` alone in its own column). A configuration whose peak would exceed
  ``--max_gib`` (default 2) is compiled and reported but not run.

On CPU, Pallas kernels only run in interpret mode (a reference interpreter, orders
of magnitude slower than compiled code): their rows are skipped unless
``--interpret``, and then they are labelled "interpret mode, not a speed
measurement". Timings are only meaningful where the kernels compile: GPU or TPU.

Examples::

  python -m vit_jax.kernels.bench                       # everything, defaults
  python -m vit_jax.kernels.bench --ops=linear,global --passes=fwd,fwd+bwd \\
      --tokens=196,1024,4096,16384 --batch=1 --heads=4 --head_dim=64
  python -m vit_jax.kernels.bench --ops=window --windows=maxvit_t_224,swin_t_224
  python -m vit_jax.kernels.bench --quick               # tiny shapes (a smoke test)

``vit_jax.tools.device_check`` times the same rows (``measure``, ``token_rows``,
``window_rows``) as its second stage.
"""

import dataclasses
import json
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import kernels
from vit_jax.kernels import _backend

OPS = ("global", "linear", "window")
PASSES = ("fwd", "fwd+bwd")

# Window attention shapes of real models: (map height, width, heads, head_dim,
# window, modes, Swin shift mask). MaxViT-T: stage 1 and 3 maps (stride 4 and 16),
# head_dim 32, window = grid = 7 at 224 and 16 at 512 (timm maxvit_tiny_tf_512).
# Swin-T: patch 4, window 7, head_dim 32; at 512 the 128x128 map is padded to 133
# (a multiple of 7) as the official implementation does.
WINDOW_CONFIGS = {
    "maxvit_t_224": [(56, 56, 2, 32, 7, ("block", "grid"), False),
                     (14, 14, 8, 32, 7, ("block", "grid"), False)],
    "maxvit_t_512": [(128, 128, 2, 32, 16, ("block", "grid"), False),
                     (32, 32, 8, 32, 16, ("block", "grid"), False)],
    "swin_t_224": [(56, 56, 3, 32, 7, ("block",), True),
                   (14, 14, 12, 32, 7, ("block",), True)],
    "swin_t_512": [(133, 133, 3, 32, 7, ("block",), True),
                   (35, 35, 12, 32, 7, ("block",), True)],
}
QUICK_WINDOWS = {"tiny": [(14, 14, 2, 16, 7, ("block", "grid"), True)]}


@dataclasses.dataclass
class Row:
  op: str
  shape: str
  impl: str
  passes: str
  time_ms: Optional[float]
  tflops: Optional[float]
  gbps: Optional[float]
  peak_mib: Optional[float]
  temp_mib: Optional[float]
  note: str = ""


def _median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up (compiled already)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _memory(compiled) -> tuple[Optional[float], Optional[float]]:
  try:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return peak / 2**20, m.temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None, None


def measure(op: str, shape: str, impl: str, passes: str, fn: Callable, args: tuple,
            flops: float, bytes_fwd: float, bytes_bwd: float, *, repeats: int,
            max_gib: float, interpret: bool = False) -> Row:
  """Compiles ``fn`` (or its forward+backward) on ``args`` and times it."""
  on_cpu = _backend.platform() not in _backend.ACCELERATORS
  in_interpret = impl != "xla" and impl != "cudnn" and on_cpu
  if in_interpret and not interpret:
    return Row(op, shape, impl, passes, None, None, None, None, None,
               "skipped: interpret mode, not a speed measurement (--interpret runs it)")
  if passes == "fwd":
    f = jax.jit(fn)
    call_args = args
    total_flops, total_bytes = flops, bytes_fwd
  else:
    def fwd_bwd(*a):
      *inputs, cotangent = a
      out, vjp = jax.vjp(fn, *inputs)
      return out, vjp(cotangent)
    f = jax.jit(fwd_bwd)
    out_shape = jax.eval_shape(fn, *args)
    call_args = args + (jnp.ones(out_shape.shape, out_shape.dtype),)
    total_flops, total_bytes = 3 * flops, bytes_fwd + bytes_bwd
  compiled = f.lower(*call_args).compile()
  peak, temp = _memory(compiled)
  note = "interpret mode, not a speed measurement" if in_interpret else ""
  if peak is not None and peak * 2**20 > max_gib * 2**30:  # peak is in MiB
    return Row(op, shape, impl, passes, None, None, None, peak, temp,
               f"not run: peak memory exceeds max_gib={max_gib}")
  seconds = _median_time(compiled, call_args, repeats)
  return Row(op, shape, impl, passes, seconds * 1e3, total_flops / seconds / 1e12,
             total_bytes / seconds / 1e9, peak, temp, note)


def _run(op, shape, impl, passes, fn, args, flops, bytes_fwd, bytes_bwd, cfg) -> Row:
  return measure(op, shape, impl, passes, fn, args, flops, bytes_fwd, bytes_bwd,
                 repeats=cfg.repeats, max_gib=cfg.max_gib, interpret=cfg.interpret)


def _impls(op: str, cfg) -> list[str]:
  """The requested implementations that exist for ``op`` on this platform."""
  here = _backend.platform()
  def exists(impl):
    if impl == "cudnn":
      return op == "global" and here == "gpu"
    if impl == "pallas" and here == "gpu":
      return op == "linear"  # the one Mosaic GPU kernel
    if impl == "pallas_triton":
      return here != "tpu"
    return True
  return [i for i in cfg.impls if exists(i)]


def _skip_after(cfg) -> bool:
  """True once ``cfg.deadline`` (a ``time.monotonic()`` value, optional) has passed."""
  return getattr(cfg, "deadline", None) is not None and time.monotonic() > cfg.deadline


def token_rows(op: str, cfg) -> list[Row]:
  rows = []
  dtype = jnp.dtype(cfg.dtype)
  b, h, d = cfg.batch, cfg.heads, cfg.head_dim
  for n in cfg.tokens:
    keys = jax.random.split(jax.random.key(n), 3)
    q, k, v = (jax.random.normal(key, (b, n, h, d), dtype) for key in keys)
    size = b * n * h * d * dtype.itemsize
    shape = f"B{b} N{n} H{h} D{d} {dtype.name}"
    for impl in _impls(op, cfg):
      if op == "global":
        fn = lambda q, k, v, impl=impl: kernels.dot_product_attention(q, k, v, impl=impl)
        flops = 4 * b * h * n * n * d
      else:
        fn = lambda q, k, v, impl=impl: kernels.linear_attention(q, k, v, impl=impl)
        flops = 4 * b * h * n * d * d
      for passes in cfg.passes:
        if _skip_after(cfg):
          rows.append(Row(op, shape, impl, passes, None, None, None, None, None,
                          "skipped: time box"))
        else:
          rows.append(_run(op, shape, impl, passes, fn, (q, k, v), flops, 4 * size,
                           8 * size, cfg))
        _print_row(rows[-1], cfg)
  return rows


def _shift_mask(height: int, width: int, window: int) -> np.ndarray:
  """Swin's shifted-window mask for a shift of window // 2 ([nW, P, P], 0 / -100)."""
  shift = window // 2
  region = np.zeros((height, width))
  label = 0
  for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
    for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
      region[hs, ws] = label
      label += 1
  ids = region.reshape(height // window, window, width // window, window)
  ids = ids.transpose(0, 2, 1, 3).reshape(-1, window * window)
  return np.where(ids[:, :, None] != ids[:, None, :], -100.0, 0.0).astype(np.float32)


def window_rows(cfg) -> list[Row]:
  rows = []
  dtype = jnp.dtype(cfg.dtype)
  configs = QUICK_WINDOWS if cfg.quick else {k: WINDOW_CONFIGS[k] for k in cfg.windows}
  configs = getattr(cfg, "window_configs", None) or configs
  for name, stages in configs.items():
    for height, width, heads, d, win, modes, shifted in stages:
      b = cfg.window_batch
      keys = jax.random.split(jax.random.key(height), 4)
      q, k, v = (jax.random.normal(key, (b, height, width, heads, d), dtype)
                 for key in keys[:3])
      p = win * win
      bias = 0.1 * jax.random.normal(keys[3], (heads, p, p), jnp.float32)
      shift_mask = jnp.asarray(_shift_mask(height, width, win)) if shifted else None
      size = q.size * dtype.itemsize
      flops = 4 * b * height * width * heads * p * d
      for mode in modes:
        mask = shift_mask if mode == "block" else None  # Swin shifts block windows
        label = f"{name} {height}x{width} h{heads} w{win} {mode}" + (
            "+shift" if mask is not None else "") + f" B{b} {dtype.name}"
        for impl in _impls("window", cfg):
          fn = (lambda q, k, v, impl=impl, mode=mode, bias=bias, mask=mask, win=win:
                kernels.window_attention(q, k, v, window=(win, win), mode=mode,
                                         bias=bias, mask=mask, impl=impl))
          for passes in cfg.passes:
            if _skip_after(cfg):
              rows.append(Row("window", label, impl, passes, None, None, None, None,
                              None, "skipped: time box"))
            else:
              rows.append(_run("window", label, impl, passes, fn, (q, k, v), flops,
                               4 * size, 8 * size, cfg))
            _print_row(rows[-1], cfg)
  return rows


def _fmt(x, spec):
  return "—" if x is None else format(x, spec)


HEADER = ("| op | shape | impl | pass | time (ms) | TFLOP/s | GB/s | peak MiB | "
          "temp MiB | note |\n|---|---|---|---|---|---|---|---|---|---|")


def _print_row(row: Row, cfg) -> None:
  if cfg.json_only:
    return
  print(f"| {row.op} | {row.shape} | {row.impl} | {row.passes} | "
        f"{_fmt(row.time_ms, '.3f')} | {_fmt(row.tflops, '.4f')} | "
        f"{_fmt(row.gbps, '.2f')} | {_fmt(row.peak_mib, '.1f')} | "
        f"{_fmt(row.temp_mib, '.1f')} | {row.note} |", flush=True)


def config_from_flags() -> SimpleNamespace:
  """The parsed flags as one settings object; one clear error for a bad value."""
  cfg = SimpleNamespace(
      ops=FLAGS.ops, impls=FLAGS.impls, passes=FLAGS.passes,
      tokens=[int(t) for t in FLAGS.tokens], batch=FLAGS.batch, heads=FLAGS.heads,
      head_dim=FLAGS.head_dim, windows=FLAGS.windows, window_batch=FLAGS.window_batch,
      dtype=FLAGS.dtype, repeats=FLAGS.repeats, max_gib=FLAGS.max_gib,
      interpret=FLAGS.interpret, quick=FLAGS.quick, json=FLAGS.json, json_only=False)
  for name, values, allowed in (("ops", cfg.ops, OPS), ("passes", cfg.passes, PASSES),
                                ("impls", cfg.impls, kernels.IMPLEMENTATIONS[:-1] + ("cudnn",)),
                                ("windows", cfg.windows, tuple(WINDOW_CONFIGS))):
    bad = sorted(set(values) - set(allowed))
    if bad:
      raise app.UsageError(f"unknown --{name} {', '.join(bad)}; choose from "
                           f"{', '.join(allowed)}")
  if cfg.quick:
    cfg.tokens = [int(t) for t in cfg.tokens if t <= 64] or [49]
    cfg.window_batch, cfg.repeats = 1, min(cfg.repeats, 2)
    cfg.heads, cfg.head_dim = min(cfg.heads, 2), min(cfg.head_dim, 16)
  return cfg


def run(cfg) -> list[Row]:
  """Every requested row, printed as a Markdown table (and written to ``cfg.json``)."""
  if not cfg.json_only:
    print(f"# backend: {_backend.platform()} ({jax.devices()[0].device_kind}), "
          f"jax {jax.__version__}")
    print(HEADER)
  rows = []
  for op in cfg.ops:
    rows += window_rows(cfg) if op == "window" else token_rows(op, cfg)
  if cfg.json:
    with open(cfg.json, "w") as f:
      json.dump({"backend": _backend.platform(),
                 "device": jax.devices()[0].device_kind,
                 "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module (tests, other
  tools) must not claim flag names other commands define."""
  flags.DEFINE_list("ops", list(OPS), f"operations: {', '.join(OPS)}")
  flags.DEFINE_list("impls", ["xla", "pallas", "cudnn"],
                    "implementations (those that do not exist for an op on this "
                    "platform are left out): xla, pallas, pallas_triton, cudnn")
  flags.DEFINE_list("passes", list(PASSES), "fwd and/or fwd+bwd")
  flags.DEFINE_list("tokens", ["196", "1024", "4096", "16384"],
                    "token counts for global and linear attention")
  flags.DEFINE_integer("batch", 1, "batch for global and linear attention")
  flags.DEFINE_integer("heads", 4, "heads for global and linear attention")
  flags.DEFINE_integer("head_dim", 64, "head dim for global and linear attention")
  flags.DEFINE_list("windows", list(WINDOW_CONFIGS),
                    f"window shape sets: {', '.join(WINDOW_CONFIGS)}")
  flags.DEFINE_integer("window_batch", 8, "batch for window attention")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "input dtype")
  flags.DEFINE_integer("repeats", 5, "timed runs per row (median)")
  flags.DEFINE_float("max_gib", 2.0, "compile but do not run rows whose peak "
                     "memory exceeds this")
  flags.DEFINE_bool("interpret", False, "run Pallas rows in interpret mode on "
                    "CPU (not a speed measurement)")
  flags.DEFINE_bool("quick", False, "tiny shapes (a smoke test)")
  flags.DEFINE_string("json", None, "also write the rows to this file")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(config_from_flags())


if __name__ == "__main__":
  define_flags()
  app.run(main)
