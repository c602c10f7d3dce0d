r"""Linear cost: a gated-scan backbone against softmax attention as the image grows.

  python -m vit_jax.tools.linear_cost                # ViG-T vs DeiT-T, 512..4096 px

For each model and image side (tokens = (side / 16)^2: 1K, 4K, 16K, 64K) it prints

- the compiled memory of one SGD training step at batch 1 (``vit_jax.tools.memory``: XLA's
  memory analysis of the compiled step, nothing allocated): ``temp`` (the step's
  scratch, mostly the activations kept for the backward pass) and the total
  ``args + output + temp - alias``;
- the CPU inference time at batch 1 (median of ``--repeats`` calls, or of one call for
  programs above ``--single_call_gflops``; the models interleaved in one process), for
  programs whose forward pass XLA counts at no more than ``--max_gflops`` (softmax
  attention at 64K tokens, 41 TFLOPs, would take hours on a CPU);

and, for every side, the ratios baseline / linear (the last model over the first) of
both. Each side's rows print as soon as they are measured, so a run cut short keeps
what it finished. The machine load (``os.getloadavg``) is printed before and after:
the timings are from whatever else runs on the machine, and only their ratios inside
one run mean anything.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vit_jax import models
from vit_jax.tools import benchmark, memory


def _load() -> str:
  return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _forward(name: str, side: int):
  """A compiled batch-1 forward pass with random parameters, and its input."""
  model = models.create(name, image_size=side)
  images = jnp.asarray(np.random.RandomState(0).randn(1, side, side, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  run = jax.jit(lambda v, x: model.apply(v, x, train=False))
  run(variables, images).block_until_ready()  # compile and warm up
  return lambda: run(variables, images).block_until_ready()


def measure(name: str, side: int) -> dict:
  """Training-step memory (MiB) and forward GFLOPs of ``name`` at ``side``."""
  stats = memory.train_step_memory(name, 1, image_size=side)
  total = stats["args"] + stats["output"] + stats["temp"] - stats["alias"]
  return {"temp": stats["temp"] / 2**20, "total": total / 2**20,
          "gflops": benchmark.forward_gflops_per_image(name, image_size=side),
          "times": []}


def time_side(rows: dict, names: list, side: int) -> None:
  """Interleaved CPU inference times of the programs under ``--max_gflops``."""
  timed = [n for n in names if rows[n]["gflops"] <= FLAGS.max_gflops]
  calls = {name: _forward(name, side) for name in timed}
  repeats = max((1 if rows[n]["gflops"] > FLAGS.single_call_gflops else FLAGS.repeats
                 for n in timed), default=0)  # --max_gflops=0: memory only
  for _ in range(repeats):
    for name in timed:
      if rows[name]["times"] and rows[name]["gflops"] > FLAGS.single_call_gflops:
        continue  # one call is enough for the big programs
      start = time.perf_counter()
      calls[name]()
      rows[name]["times"].append(time.perf_counter() - start)


def _row(name: str, side: int, r: dict) -> str:
  if r["times"]:
    t = f"{statistics.median(r['times']):.2f} ({len(r['times'])})"
  else:
    t = f"not run (> {FLAGS.max_gflops:g} GFLOPs)"
  return (f"| {name} | {side}x{side} | {(side // 16) ** 2:,} | {r['temp']:,.0f} | "
          f"{r['total']:,.0f} | {r['gflops']:,.1f} | {t} |")


def _ratio(side: int, rows: dict, linear: str, baseline: str) -> str:
  a, b = rows[linear], rows[baseline]
  line = (f"{side}x{side} ({(side // 16) ** 2:,} tokens): {baseline} / {linear} "
          f"training-step memory {b['total'] / a['total']:.1f}x (total), "
          f"{b['temp'] / a['temp']:.1f}x (temp)")
  if a["times"] and b["times"]:
    line += (f"; CPU inference time "
             f"{statistics.median(b['times']) / statistics.median(a['times']):.1f}x")
  return line


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module (tests, other
  tools) must not claim flag names other commands define."""
  flags.DEFINE_list("models", ["vig_tiny", "deit_tiny_patch16_224"],
                    "Registered models: the linear one first, the baseline last.")
  flags.DEFINE_list("sides", ["512", "1024", "2048", "4096"], "Image sides.")
  flags.DEFINE_integer("repeats", 3, "Timed calls per program.")
  flags.DEFINE_float("single_call_gflops", 500.0,
                     "Programs above this many GFLOPs are timed with one call.")
  flags.DEFINE_float("max_gflops", 3000.0,
                     "Time only forward passes of at most this many GFLOPs.")


def main(argv):
  del argv
  names, sides = FLAGS.models, [int(s) for s in FLAGS.sides]
  print(f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"{os.cpu_count()} CPUs; {_load()}", flush=True)
  print("\n| model | image | tokens | train step: temp MiB | train step: total MiB "
        "| forward GFLOPs | CPU inference s (calls) |\n|---|---|---:|---:|---:|---:|---:|",
        flush=True)
  ratios = []
  for side in sides:
    rows = {name: measure(name, side) for name in names}
    time_side(rows, names, side)
    for name in names:
      print(_row(name, side, rows[name]), flush=True)
    if len(names) > 1:
      ratios.append(_ratio(side, rows, names[0], names[-1]))
      print("  " + ratios[-1], flush=True)
  print("\n" + "\n".join(ratios))
  print(_load())


if __name__ == "__main__":
  define_flags()
  app.run(main)
