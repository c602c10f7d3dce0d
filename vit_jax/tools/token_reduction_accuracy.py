r"""Accuracy against GFLOPs of token reduction on trained classifiers (no retraining).

  python -m vit_jax.tools.token_reduction_accuracy \
      --run=plain=workdirs/tr_plain --run="ToMe r=8 trained=workdirs/tr_tome" \
      --merging=0,2,4,6,8,10 --keep_rates=0.9,0.7,0.5,0.3 \
      --markdown=docs/token_reduction.md --png=docs/token_reduction_accuracy.png

Every ``--run`` (``label=workdir`` of a classification run) is evaluated on its eval
split as it was trained; the first run is also evaluated with each ToMe ``r``
(``token_merging``) and EViT keep rate (``token_keep_rate``, its default blocks)
applied to its weights without retraining. GFLOPs per image are XLA's cost analysis
of the compiled forward pass (``tools/benchmark.compiled_flops``). The table goes
between markers in ``--markdown``; the plot is drawn with PIL (already a dependency
through ``vit_jax.visualize``; matplotlib is not one).
"""

import dataclasses
import json
import os
import subprocess
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
TABLE_BEGIN = "<!-- token-reduction-accuracy:begin -->"
TABLE_END = "<!-- token-reduction-accuracy:end -->"
TRAINED = "150 more steps (evaluated as trained)"


@dataclasses.dataclass
class Point:
  series: str  # "ToMe (no retraining)", "EViT (no retraining)" or TRAINED
  label: str
  gflops: float
  top1: float
  tokens: str = ""  # tokens after each block


def sweep(merging: Sequence[int], keep_rates: Sequence[float]) -> list[tuple[str, str, dict]]:
  """``(series, label, model overrides)`` for the evaluation without retraining."""
  out = [("plain", "plain", {})]
  out += [("ToMe (no retraining)", f"ToMe r={r}", {"token_merging": r})
          for r in merging if r]
  out += [("EViT (no retraining)", f"EViT keep={k}", {"token_keep_rate": k})
          for k in keep_rates if k < 1]
  return out


def markdown(points: Sequence[Point]) -> str:
  lines = ["| series | setting | tokens after each block | GFLOPs/img | test top-1 |",
           "|---|---|---|---:|---:|"]
  for p in points:
    lines.append(f"| {p.series} | {p.label} | {p.tokens} | {p.gflops:.4f} | "
                 f"{100 * p.top1:.2f}% |")
  return "\n".join(lines)


def plot(points: Sequence[Point], path: str, size: tuple[int, int] = (720, 480)) -> None:
  """Top-1 (%) against GFLOPs/img, one colour per series, lines within a series."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  left, right, top, bottom = 70, size[0] - 20, 30, size[1] - 60
  xs, ys = [p.gflops for p in points], [100 * p.top1 for p in points]
  x0, x1 = min(xs), max(xs)
  y0, y1 = min(ys), max(ys)
  pad_x, pad_y = (x1 - x0) * 0.05 or 1e-3, (y1 - y0) * 0.08 or 0.5
  x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
  to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left),
                        bottom - (y - y0) / (y1 - y0) * (bottom - top))
  draw.rectangle([left, top, right, bottom], outline="black")
  for i in range(6):  # ticks and grid
    x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
    px, _ = to_px(x, y0)
    _, py = to_px(x0, y)
    draw.line([px, top, px, bottom], fill=(225, 225, 225))
    draw.line([left, py, right, py], fill=(225, 225, 225))
    draw.text((px - 18, bottom + 6), f"{x:.4f}", fill="black")
    draw.text((left - 45, py - 6), f"{y:.1f}", fill="black")
  draw.text(((left + right) // 2 - 60, bottom + 30), "GFLOPs per image (XLA)", fill="black")
  draw.text((8, top - 22), "test top-1 (%)", fill="black")
  colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
             (148, 103, 189)]
  names = list(dict.fromkeys(p.series for p in points))
  for n, name in enumerate(names):
    colour = colours[n % len(colours)]
    series = sorted((p for p in points if p.series == name), key=lambda p: p.gflops)
    pixels = [to_px(p.gflops, 100 * p.top1) for p in series]
    if len(pixels) > 1 and name != TRAINED:
      draw.line(pixels, fill=colour, width=2)
    for (px, py), p in zip(pixels, series):
      draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
      if name == TRAINED:  # labels near the right edge go to the point's left
        width = draw.textlength(p.label)
        draw.text((px + 6 if px + 6 + width < right else px - 6 - width, py - 12),
                  p.label, fill=colour)
    draw.rectangle([right - 190, top + 10 + 16 * n, right - 180, top + 20 + 16 * n],
                   fill=colour)
    draw.text((right - 175, top + 8 + 16 * n), name, fill="black")
  image.save(path)


def write_markdown(path: str, block: str) -> None:
  text = open(path).read() if os.path.exists(path) else ""
  block = f"{TABLE_BEGIN}\n{block}\n{TABLE_END}"
  if TABLE_BEGIN in text and TABLE_END in text:
    text = (text[:text.index(TABLE_BEGIN)] + block
            + text[text.index(TABLE_END) + len(TABLE_END):])
  else:
    text = text + ("\n" if text else "") + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def evaluate(workdir: str, overrides: dict, batch: int) -> tuple[float, float, str]:
  """``(top-1, GFLOPs/img, tokens after each block)`` of a run's latest checkpoint
  with ``overrides`` applied to its model settings."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import models, sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_pipeline, preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import classification  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  builder = input_pipeline.get_builder(config["input"]["dataset"],
                                       config["input"].get("data_dir"))
  num_classes = builder.info.features["label"].num_classes
  model = models.create(config["model_name"], **{"num_classes": num_classes,
                                                  **config["model"], **overrides})
  variables, _ = workdir_lib.read_variables(workdir)
  mesh = sharding.make_mesh({"data": -1})
  evaluator = classification.ClassificationEvaluator(
      lambda v, x: model.apply(v, x, train=False), builder, config["input"]["eval_split"],
      preprocess_fn=preprocess.parse(config["input"]["pp_eval"]), batch_size=batch,
      sharding=sharding.batch_sharding(mesh))
  top1 = evaluator.run(variables)["top1"]
  images = jnp.zeros((1,) + evaluator.image_shape, jnp.float32)
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  flops = benchmark.compiled_flops(jax.jit(lambda v, x: model.apply(v, x, train=False))
                                   .lower(variables, images).compile())
  inter = jax.eval_shape(lambda v, x: models.forward_intermediates(model, v, x)[1],
                         variables, images)
  counts = [str(inter[k].shape[1]) for k in sorted(
      (k for k in inter if k.startswith("Transformer/block_")),
      key=lambda k: int(k.rsplit("_", 1)[1]))]
  return float(top1), float(np.float64(flops) / 1e9), ", ".join(counts)


def define_flags():
  flags.DEFINE_multi_string("run", [], "label=workdir of a trained classification run; "
                            "the first is also swept without retraining.")
  flags.DEFINE_list("merging", ["0", "2", "4", "8"], "ToMe r values for the sweep.")
  flags.DEFINE_list("keep_rates", ["0.9", "0.7", "0.5"], "EViT keep rates for the sweep.")
  flags.DEFINE_integer("batch", 360, "Eval batch size.")
  flags.DEFINE_string("markdown", None, "Write the table into this file (between the "
                      f"{TABLE_BEGIN} markers when present).")
  flags.DEFINE_string("png", None, "Write the plot here.")
  flags.DEFINE_string("json", None, "Points file: settings already in it are not "
                      "evaluated again (same run label, series and setting); new "
                      "points are added.")


def main(argv):
  del argv
  runs = [tuple(r.rsplit("=", 1)) for r in FLAGS.run]
  if not runs or any(len(r) != 2 for r in runs):
    raise app.UsageError("give --run=label=workdir at least once")
  cached = {}
  if FLAGS.json and os.path.exists(FLAGS.json):
    with open(FLAGS.json) as f:
      cached = {(p["series"], p["label"]): Point(**p) for p in json.load(f)}
  points: list[Point] = []

  def add(series, label, workdir, overrides):
    if (series, label) not in cached:
      top1, gflops, tokens = evaluate(workdir, overrides, FLAGS.batch)
      cached[(series, label)] = Point(series, label, gflops, top1, tokens)
      if FLAGS.json:  # after every point: an interrupted sweep keeps what it did
        with open(FLAGS.json, "w") as f:
          json.dump([dataclasses.asdict(p) for p in cached.values()], f, indent=1)
    points.append(cached[(series, label)])
    print(points[-1], flush=True)

  base_label, base_dir = runs[0]
  for series, label, overrides in sweep([int(r) for r in FLAGS.merging],
                                        [float(k) for k in FLAGS.keep_rates]):
    add(series, label if overrides else base_label, base_dir, overrides)
  for label, workdir in runs[1:]:
    add(TRAINED, label, workdir, {})
  # The plain model belongs to both no-retraining curves.
  plain = points[0]
  drawn = points + [dataclasses.replace(plain, series=s) for s in
                    dict.fromkeys(p.series for p in points[1:] if p.series != TRAINED)]
  drawn = [p for p in drawn if p.series != "plain"] or drawn
  load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  table = markdown(points)
  print(table)
  if FLAGS.png:
    plot(drawn, FLAGS.png)
  if FLAGS.markdown:
    write_markdown(FLAGS.markdown, f"uptime: {load}\n\n{table}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
