r"""XLA's and PyTorch's matrix products on this host, side by side.

  python -m vit_jax.tools.matmul_ab
  python -m vit_jax.tools.matmul_ab --shapes=1576x192x768,25088x64x256 --repeats=50

Ratios to timm move with the host more than with our code: on one 2-core "AMD EPYC"
virtual machine XLA's products ran at PyTorch's speed, on another (a newer CPU family,
same name) at twice it, and ViT-Ti's train step went from 0.90x to 1.25x timm's with
them. This prints, for each ``MxKxN`` shape, the three products of a dense layer on
``[M, K]`` with a ``[K, N]`` weight: the forward (``x @ w``), the input gradient
(``g @ w.T``) and the weight gradient (``x.T @ g``), timed in JAX (jit, float32) and in
PyTorch (a worker process, as ``benchmark_timm``: PyTorch and TensorFlow must not
share a process), both on ``--threads`` threads; the median of ``--repeats`` calls each.
Run it beside a benchmark table so the table's host can be told apart from another's.
The default shapes are the MLP products of ViT-Ti (batch 8, 197 tokens) and of the
first stages of PVT v2-b0 and ConvFormer-S18 (batch 8, 56x56 tokens).
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

DEFAULT_SHAPES = "1576x192x768,1576x768x192,25088x32x256,25088x64x256"
PRODUCTS = ("forward", "input_grad", "weight_grad")

FLAGS = flags.FLAGS


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
  """``"1576x192x768,..."`` -> [(1576, 192, 768), ...], or a ValueError naming the bad one."""
  shapes = []
  for item in text.split(","):
    parts = item.strip().lower().split("x")
    try:
      shape = tuple(int(p) for p in parts)
    except ValueError:
      shape = ()
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f"--shapes: expected MxKxN with positive integers, got {item!r}")
    shapes.append(shape)
  return shapes


def jax_products():
  """The three products as jitted JAX functions of (x, w, g), in the layouts a dense
  layer's forward and backward hand XLA (one contracting axis each)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  dot = lambda a, b, ca, cb: lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))
  return {"forward": jax.jit(lambda x, w, g: dot(x, w, 1, 0)),
          "input_grad": jax.jit(lambda x, w, g: dot(g, w, 1, 1)),
          "weight_grad": jax.jit(lambda x, w, g: dot(x, g, 0, 0))}


def _median_ms(call, repeats: int, block) -> float:
  block(call())  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(call())
    times.append(time.perf_counter() - start)
  times.sort()
  return 1e3 * times[len(times) // 2]


def time_jax(shape, repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  m, k, n = shape
  rng = np.random.default_rng(0)
  x, w, g = (jax.numpy.asarray(rng.standard_normal(s, np.float32))
             for s in ((m, k), (k, n), (m, n)))
  return {name: _median_ms(lambda f=f: f(x, w, g), repeats, jax.block_until_ready)
          for name, f in jax_products().items()}


def _torch_worker(spec: dict) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  out = []
  for m, k, n in spec["shapes"][:1] + spec["shapes"]:  # the first pass is a warm-up
    x, w, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    calls = {"forward": lambda: x @ w, "input_grad": lambda: g @ w.T,
             "weight_grad": lambda: x.T @ g}
    out.append({name: _median_ms(c, spec["repeats"], lambda _: None)
                for name, c in calls.items()})
  print("@@" + json.dumps({"ms": out[1:], "torch": torch.__version__,
                           "threads": torch.get_num_threads()}), flush=True)


def time_torch(shapes, repeats: int, threads: int) -> dict:
  spec = json.dumps({"shapes": shapes, "repeats": repeats, "threads": threads})
  proc = subprocess.run([sys.executable, "-m", "vit_jax.tools.matmul_ab", "--worker", spec],
                        capture_output=True, text=True, timeout=1800)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("@@")]
  if proc.returncode or not lines:
    raise RuntimeError(f"the PyTorch worker failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-2000:]}")
  return json.loads(lines[-1][2:])


def main(argv):
  del argv
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    shapes = parse_shapes(FLAGS.shapes)
  except ValueError as e:
    raise app.UsageError(str(e))
  if FLAGS.repeats < 1:
    raise app.UsageError(f"--repeats must be >= 1, got {FLAGS.repeats}")
  threads = FLAGS.threads or len(os.sched_getaffinity(0))
  print(f"host: {benchmark.cpu_model()}, {len(os.sched_getaffinity(0))} CPUs usable; "
        f"JAX {jax.__version__} ({jax.default_backend()}), float32", flush=True)
  # The first products a process times run slow (thread pool start-up: the first shape's
  # forward measured 2x its own later median), so a throwaway pass comes first.
  time_jax(shapes[0], FLAGS.repeats)
  ours = [time_jax(s, FLAGS.repeats) for s in shapes]
  theirs = time_torch(shapes, FLAGS.repeats, threads)
  print(f"PyTorch {theirs['torch']} on {theirs['threads']} threads")
  print(f"{'M x K x N':>18}  {'product':<12} {'XLA ms':>8} {'torch ms':>9} "
        f"{'XLA GFLOP/s':>12} {'torch GFLOP/s':>14} {'torch/XLA time':>15}")
  for (m, k, n), a, b in zip(shapes, ours, theirs["ms"]):
    flop = 2 * m * k * n
    for name in PRODUCTS:
      # Significant digits, not decimals: a tiny shape on a busy machine must not print 0.
      print(f"{f'{m}x{k}x{n}':>18}  {name:<12} {a[name]:8.4g} {b[name]:9.4g} "
            f"{flop / a[name] / 1e6:12.4g} {flop / b[name] / 1e6:14.4g} "
            f"{b[name] / a[name]:14.3g}x")


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _torch_worker(json.loads(sys.argv[2]))  # no JAX, no TensorFlow in this process
  else:
    flags.DEFINE_string("shapes", DEFAULT_SHAPES, "Comma-separated MxKxN: a dense layer "
                        "on [M, K] inputs with a [K, N] weight.")
    flags.DEFINE_integer("repeats", 30, "Timed calls per product and side (median).")
    flags.DEFINE_integer("threads", 0, "Threads for PyTorch (0: the CPUs this process "
                         "may use, which is what XLA's pool takes).")
    app.run(main)
