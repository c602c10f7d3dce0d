r"""Linear cost: a gated-scan backbone against softmax attention as the image grows.

  python -m vit_jax.tools.linear_cost                # ViG-T vs DeiT-T, 512..4096 px

For each model and image side (tokens = (side / 16)^2: 1K, 4K, 16K, 64K) it prints

- the compiled memory of one SGD training step at batch 1 (``vit_jax.tools.memory``: XLA's
  memory analysis of the compiled step, nothing allocated): ``temp`` (the step's
  scratch, mostly the activations kept for the backward pass) and the total
  ``args + output + temp - alias``;
- the CPU inference time at batch 1 (median of ``--repeats`` calls, the models
  interleaved in one process), for programs whose forward pass XLA counts at no more
  than ``--max_gflops`` (softmax attention at 16K+ tokens would take many minutes);

and, at ``--headline_side`` (1024), the ratios DeiT-T / ViG-T of both. The machine
load (``os.getloadavg``) is printed before and after: the timings are from whatever
else runs on the machine, and only their ratios inside one run mean anything.
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

_MODELS = flags.DEFINE_list("models", ["vig_tiny", "deit_tiny_patch16_224"],
                            "Registered models: the linear one first, then the baseline.")
_SIDES = flags.DEFINE_list("sides", ["512", "1024", "2048", "4096"], "Image sides.")
_HEADLINE = flags.DEFINE_integer("headline_side", 1024, "Side of the ratio line.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per program.")
_MAX_GFLOPS = flags.DEFINE_float("max_gflops", 250.0,
                                 "Time only forward passes of at most this many GFLOPs.")


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


def main(argv):
  del argv
  names, sides = _MODELS.value, [int(s) for s in _SIDES.value]
  print(f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"{os.cpu_count()} CPUs; {_load()}")
  rows = {}
  for side in sides:
    for name in names:
      stats = memory.train_step_memory(name, 1, image_size=side)
      total = stats["args"] + stats["output"] + stats["temp"] - stats["alias"]
      gflops = benchmark.forward_gflops_per_image(name, image_size=side)
      rows[name, side] = {"temp": stats["temp"] / 2**20, "total": total / 2**20,
                          "gflops": gflops, "times": []}
  # Time the programs under the budget, interleaving the models at each size.
  for side in sides:
    timed = [n for n in names if rows[n, side]["gflops"] <= _MAX_GFLOPS.value]
    calls = {name: _forward(name, side) for name in timed}
    for _ in range(_REPEATS.value):
      for name in timed:
        start = time.perf_counter()
        calls[name]()
        rows[name, side]["times"].append(time.perf_counter() - start)
    del calls

  print("\n| model | image | tokens | train step: temp MiB | train step: total MiB "
        "| forward GFLOPs | CPU inference s |\n|---|---|---:|---:|---:|---:|---:|")
  for side in sides:
    for name in names:
      r = rows[name, side]
      t = f"{statistics.median(r['times']):.2f}" if r["times"] else "not run"
      print(f"| {name} | {side}x{side} | {(side // 16) ** 2:,} | {r['temp']:,.0f} | "
            f"{r['total']:,.0f} | {r['gflops']:,.1f} | {t} |")
  linear, baseline = names[0], names[-1]
  a, b = rows[linear, _HEADLINE.value], rows[baseline, _HEADLINE.value]
  line = (f"\nAt {_HEADLINE.value}x{_HEADLINE.value}: training-step memory "
          f"{baseline} / {linear} = {b['total'] / a['total']:.1f}x (total), "
          f"{b['temp'] / a['temp']:.1f}x (temp)")
  if a["times"] and b["times"]:
    speedup = statistics.median(b["times"]) / statistics.median(a["times"])
    line += f"; CPU inference time {speedup:.1f}x"
  print(line + ".")
  print(_load())


if __name__ == "__main__":
  app.run(main)
