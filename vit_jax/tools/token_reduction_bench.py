r"""Inference speed and FLOPs of ToMe, EViT and DynamicViT settings, side by side in one run.

  python -m vit_jax.tools.token_reduction_bench --model=vit_base_patch16_224 \
      --merging=0,8,16 --keep_rates=0.7,0.5 --pruning=0.7 --batch=16 \
      --markdown=docs/token_reduction.md

For each model, every setting (the plain model, ToMe ``token_merging=r``, EViT
``token_keep_rate=k`` and DynamicViT ``token_pruning=rho`` at their default blocks;
DynamicViT's predictors are randomly initialised, which does not change its token
counts or cost) is compiled first; then the timed
repeats are interleaved (plain, r=8, r=16, k=0.7, ..., plain, r=8, ...), so that a
loaded machine slows each setting alike and the ratios to the plain model stay
meaningful. Timing, FLOPs (XLA's cost analysis of the compiled forward pass) and the
program are those of ``vit_jax.tools.benchmark``: the median repeat's images/s.
"""

import dataclasses
import os
import statistics
import subprocess
from typing import Optional

from absl import app, flags

from vit_jax.tools import benchmark

FLAGS = flags.FLAGS
TABLE_BEGIN = "<!-- token-reduction-table:begin -->"
TABLE_END = "<!-- token-reduction-table:end -->"


@dataclasses.dataclass
class Result:
  model: str
  setting: str
  gflops: Optional[float]
  images_per_s: float
  speedup: float
  repeats_ms: str


def settings(merging: list[int], keep_rates: list[float],
             pruning: tuple[float, ...] = ()) -> dict[str, dict]:
  """Setting label -> model overrides; the plain model first."""
  out = {"plain": {}}
  out.update({f"ToMe r={r}": {"token_merging": r} for r in merging if r})
  out.update({f"EViT keep={k}": {"token_keep_rate": k} for k in keep_rates if k < 1})
  out.update({f"DynamicViT rho={p}": {"token_pruning": p} for p in pruning if p < 1})
  return out


def rejected_settings(model: str, setting_overrides: dict[str, dict]) -> dict[str, str]:
  """Setting label -> the model's error, for the settings ``model`` rejects (e.g. a
  keep rate outside (0, 1], or DynamicViT's ``rho`` keeping no token in its last stage).

  Checked by shape inference before any compile, so that a long run does not stop
  halfway at its first bad setting.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  out = {}
  for label, overrides in setting_overrides.items():
    try:
      net = models.create(model, **overrides)
      shape = models.input_shape(model, batch=1, **overrides)
      jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False),  # pylint: disable=cell-var-from-loop
                     jnp.zeros(shape, jnp.float32))
    except ValueError as e:
      out[label] = str(e).splitlines()[0]
  return out


def clamped_settings(model: str, setting_overrides: dict[str, dict]) -> dict[str, str]:
  """Setting label -> what ToMe's per-block clamp makes of it, for the ToMe settings
  whose requested ``r`` some block of ``model`` cannot merge (ViT-L/16 at r=16)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  out = {}
  for label, overrides in setting_overrides.items():
    if not overrides.get("token_merging"):
      continue
    net = models.create(model, **overrides)
    height, width = models.input_shape(model, batch=1, **overrides)[1:3]
    effective = net.effective_token_merging((height, width))
    if effective != (overrides["token_merging"],) * len(effective):
      tokens = ((height // net.run_patch_size) * (width // net.run_patch_size)
                + net.num_prefix_tokens)
      out[label] = (f"r per block {', '.join(map(str, effective))} (clamped to half "
                    f"the unprotected tokens, as ToMe does): {tokens} tokens in, "
                    f"{tokens - sum(effective)} after the last block")
  return out


def run(model: str, setting_overrides: dict[str, dict], *, batch: int, dtype: str,
        warmup: int, steps: int, repeats: int) -> list[Result]:
  """Compiles every setting, then times them interleaved; returns one row each."""
  programs = {}
  for label, overrides in setting_overrides.items():
    overrides = dict(overrides, dtype=dtype)
    step, args, _, fwd, _, _ = benchmark.build_programs(model, "infer", batch, overrides)
    for _ in range(warmup):
      benchmark.time_repeat(step, args, "infer", 1)
    programs[label] = (step, args, benchmark.compiled_flops(fwd))
  times = {label: [] for label in programs}
  for _ in range(repeats):
    for label, (step, args, _) in programs.items():
      seconds, _ = benchmark.time_repeat(step, args, "infer", steps)
      times[label].append(seconds)
  plain = batch / statistics.median(times["plain"])
  rows = []
  for label, (_, _, flops) in programs.items():
    rate = batch / statistics.median(times[label])
    rows.append(Result(model, label, flops / batch / 1e9 if flops else None, rate,
                       rate / plain, " ".join(f"{t * 1e3:.0f}" for t in times[label])))
  return rows


def markdown(rows: list[Result]) -> str:
  lines = ["| model | setting | GFLOPs/img | img/s | vs plain | repeats (ms/step) |",
           "|---|---|---:|---:|---:|---|"]
  for r in rows:
    gflops = f"{r.gflops:.1f}" if r.gflops else "-"
    lines.append(f"| {r.model} | {r.setting} | {gflops} | {r.images_per_s:.1f} | "
                 f"{r.speedup:.2f}x | {r.repeats_ms} |")
  return "\n".join(lines)


def define_flags():
  flags.DEFINE_list("model", ["vit_base_patch16_224"], "Registered models (plain ViTs).")
  flags.DEFINE_list("merging", ["0", "8", "16"], "ToMe r values (0: the plain model).")
  flags.DEFINE_list("keep_rates", ["1.0", "0.7", "0.5"],
                    "EViT keep rates (1.0: the plain model).")
  flags.DEFINE_list("pruning", [], "DynamicViT keep ratios rho (1.0: the plain model).")
  flags.DEFINE_integer("batch", 16, "Images per step.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype.")
  flags.DEFINE_integer("warmup", 1, "Untimed steps per setting after compiling.")
  flags.DEFINE_integer("steps", 2, "Steps per timed repeat.")
  flags.DEFINE_integer("repeats", 5, "Interleaved repeats per setting.")
  flags.DEFINE_string("markdown", None, "Write the table into this file (between the "
                      f"{TABLE_BEGIN} markers when present).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  chosen = settings([int(r) for r in FLAGS.merging],
                    [float(k) for k in FLAGS.keep_rates],
                   [float(p) for p in FLAGS.pruning])
  rejected = {model: rejected_settings(model, chosen) for model in FLAGS.model}
  rows = []
  for model in FLAGS.model:
    usable = {k: v for k, v in chosen.items() if k not in rejected[model]}
    rows += run(model, usable, batch=FLAGS.batch, dtype=FLAGS.dtype, warmup=FLAGS.warmup,
                steps=FLAGS.steps, repeats=FLAGS.repeats)
  load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  device = jax.devices()[0]
  header = (f"{device.platform} ({device.device_kind}), batch {FLAGS.batch}, "
            f"{FLAGS.dtype}; uptime: {load}")
  table = markdown(rows)
  notes = [f"{model} {label}: not run, the model rejects it ({message})"
           for model, bad in rejected.items() for label, message in bad.items()]
  notes += [f"{model} {label}: {message}" for model in FLAGS.model
            for label, message in clamped_settings(
                model, {k: v for k, v in chosen.items()
                        if k not in rejected[model]}).items()]
  if notes:
    table += "\n\n" + "\n".join(f"* {n}" for n in notes)
  print(header)
  print(table)
  if FLAGS.markdown:
    block = f"{TABLE_BEGIN}\n{header}\n\n{table}\n{TABLE_END}"
    text = open(FLAGS.markdown).read() if os.path.exists(FLAGS.markdown) else ""
    if TABLE_BEGIN in text and TABLE_END in text:
      text = text[:text.index(TABLE_BEGIN)] + block + text[text.index(TABLE_END) +
                                                           len(TABLE_END):]
    else:
      text = text + ("\n" if text else "") + block + "\n"
    with open(FLAGS.markdown, "w") as f:
      f.write(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
