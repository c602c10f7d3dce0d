r"""Everything an accelerator session should measure first, in one command.

  python -m vit_jax.tools.device_check --out=DIR           # on a GPU: <= 8 minutes
  python -m vit_jax.tools.device_check --out=DIR --tiny    # every stage at tiny sizes

Four stages, each time-boxed (``--budget_s`` split 15/30/30/25%; a stage past its box
reports what it skipped) and printing its progress:

1. **Correctness**: every kernel this platform has, forward and gradient against its
   pure-JAX reference at the test shapes, float32 and bfloat16, with max errors and
   the tolerances of ``vit_jax.kernels.parity`` (on GPU: the Mosaic GPU linear
   attention, cuDNN global attention, and the ``pallas_triton`` fallback of all three
   kernels; on TPU: the Mosaic kernels; on CPU: the same in interpret modes).
2. **Kernel timings** (``vit_jax.kernels.bench``), bfloat16, forward and
   forward+backward, against the XLA reference (and cuDNN for global attention):
   global attention at 197/577/1,024 tokens, window and grid attention at MaxViT-T and
   Swin-T shapes at 224 and 512, linear attention at 4K and 16K tokens. The fastest
   forward+backward implementation per operation (among those that passed stage 1)
   becomes this platform's bfloat16 entry of ``DIR/auto_table.json``, in the format of
   ``vit_jax/kernels/auto_table.json``: copying it there makes ``impl="auto"`` follow
   the measurement.
3. **Training**: the ViT-B/16 bfloat16 training step at batch 256 (AdamW) with
   ``vit_jax.tools.benchmark``: img/s and MFU (model FLOPs = 3x the forward FLOPs of XLA's
   cost analysis, over the ``benchmark.PEAK_TFLOPS`` peak of the device kind), beside
   timm + ``torch.compile`` with bf16 autocast, same batch, AdamW, repeats interleaved.
4. **Inference**: Swin-T, MaxViT-T and EfficientViT-B2 at batch 256 in bfloat16,
   beside timm + ``torch.compile``.

Writes ``DIR/device_check.json`` (every row, the environment) and
``DIR/device_check.md`` (the tables ``docs/gpu.md`` records), plus
``DIR/auto_table.json``. ``--tiny`` (the default on CPU) runs every stage at tiny
sizes (one kernel case per family, one model per model stage) with timm eager (compiling is too slow on a CPU): a smoke test of the command,
not a measurement. Needs only jax, flax, optax, orbax, chex, torch and timm: nothing
here imports TensorFlow, TFDS, clu or ml_collections (the JSON lists any that got
imported).
"""

import os

# Before JAX starts: leave GPU memory to the timm worker process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import datetime
import functools
import json
import pathlib
import sys
import time
from types import SimpleNamespace
from typing import Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from vit_jax.tools import benchmark
from vit_jax import kernels
from vit_jax.kernels import _backend
from vit_jax.kernels import bench
from vit_jax.kernels import parity
from vit_jax.kernels.attention import pallas as attention_pallas
from vit_jax.kernels.attention import reference as attention_reference
from vit_jax.kernels.linear_attention import mosaic_gpu as linear_mosaic_gpu
from vit_jax.kernels.linear_attention import pallas as linear_pallas
from vit_jax.kernels.linear_attention import reference as linear_reference
from vit_jax.kernels.window_attention import pallas as window_pallas
from vit_jax.kernels.window_attention import reference as window_reference


STAGES = ("correctness", "kernels", "training", "inference")
STAGE_SHARE = {"correctness": 0.15, "kernels": 0.30, "training": 0.30, "inference": 0.25}
HEAVY_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "ml_collections")

# Stage 3 and 4 models: (registry name, batch, tiny overrides, the same in timm).
TRAIN_MODEL = ("vit_base_patch16_224", 256,
               dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                    num_heads=2, mlp_dim=64, num_classes=10),
               dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                    mlp_ratio=2.0))
INFER_MODELS = [
    ("swin_tiny_patch4_window7_224", 256,
     dict(image_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4,
          num_classes=10),
     dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)),
    ("maxvit_tiny_tf_224", 256,
     dict(image_size=64, depths=(1, 1, 1, 1), num_classes=10),
     dict(img_size=64, depths=(1, 1, 1, 1))),
    ("efficientvit_b2", 256,
     dict(depths=(1, 1, 1, 1, 1), image_size=64, num_classes=10),
     dict(depths=(1, 1, 1, 1, 1))),
]


@dataclasses.dataclass
class Check:
  op: str
  impl: str
  dtype: str
  shape: str
  max_error: Optional[float]  # over the output and every gradient, relative to scale
  worst: str  # which output/gradient had it
  passed: bool
  seconds: float
  note: str = ""


def _log(message: str) -> None:
  print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------
# 1. Correctness
# ----------------------------------------------------------------------------

def _kernel_cases(platform: str, tiny: bool):
  """``(op, impl, kernel_fn, reference_fn, args, argnums, dtypes)`` for this platform."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  n = 70 if tiny else 197
  b, heads, d = (1, 1, 32) if tiny else (2, 3, 64)
  tokens = [parity.normal(i, (b, n, heads, d)) for i in range(3)]
  fmap_shape = (1, 14, 14, 1, 16) if tiny else (2, 14, 14, 3, 32)
  fmap = [parity.normal(3 + i, fmap_shape) for i in range(3)]
  wheads = fmap_shape[3]
  bias, mask = parity.normal(6, (wheads, 49, 49)), jnp.asarray(bench._shift_mask(14, 14, 7))  # pylint: disable=protected-access
  linear_ref = functools.partial(linear_reference.linear_attention_reference,
                                 feature_map="elu+1")
  global_ref = attention_reference.attention_reference
  window_ref = lambda mode: (lambda q, k, v, bias, mask: window_reference
                             .window_attention_reference(q, k, v, window=(7, 7), mode=mode,
                                                         bias=bias, mask=mask))
  half_only, both = (bf16,), (f32, bf16)
  cases = []
  # The pallas_call kernels: Mosaic on TPU; elsewhere the Triton fallback.
  pallas_call = [("pallas", "tpu")] if platform == "tpu" else [("pallas_triton", "triton")]
  if platform != "tpu":
    cases.append(("linear", "pallas (Mosaic GPU)",
                  functools.partial(linear_mosaic_gpu.linear_attention, feature_map="elu+1"),
                  linear_ref, tokens, (0, 1, 2), half_only))
  if platform == "gpu":
    cases.append(("global", "cudnn", functools.partial(
        jax.nn.dot_product_attention, implementation="cudnn"), global_ref, tokens,
                  (0, 1, 2), half_only))
  for impl, backend in pallas_call:
    dtypes = (f32,) if tiny else both
    cases.append(("linear", impl, functools.partial(
        linear_pallas.linear_attention, feature_map="elu+1", backend=backend),
                  linear_ref, tokens, (0, 1, 2), dtypes))
    cases.append(("global", impl, functools.partial(
        attention_pallas.flash_attention, backend=backend), global_ref, tokens,
                  (0, 1, 2), dtypes))
    for mode, extra in (("block", (bias, mask)), ("grid", (bias, None))):
      kernel = (lambda q, k, v, bias, mask, mode=mode, backend=backend:
                window_pallas.window_attention(q, k, v, window=(7, 7), mode=mode,
                                               bias=bias, mask=mask, backend=backend))
      argnums = (0, 1, 2, 3) + ((4,) if extra[1] is not None else ())
      cases.append((f"window {mode}", impl, kernel, window_ref(mode), fmap + list(extra),
                    argnums, dtypes))
  return cases


def correctness(platform: str, tiny: bool, deadline: float) -> list[Check]:
  rows = []
  cases = _kernel_cases(platform, tiny)
  if tiny:  # the smoke run checks one case per kernel family (the suite checks all)
    cases = [c for c in cases if c[:2] in (("linear", "pallas (Mosaic GPU)"),
                                           ("global", "pallas_triton"), ("global", "pallas"))]
  for op, impl, kernel, reference, args, argnums, dtypes in cases:
    shape = "x".join(map(str, args[0].shape))
    for dtype in dtypes:
      name = jnp.dtype(dtype).name
      if time.monotonic() > deadline:
        rows.append(Check(op, impl, name, shape, None, "", False, 0.0, "skipped: time box"))
        continue
      start = time.monotonic()
      try:
        diffs = parity.compare(kernel, reference, args, argnums, dtype)
        worst = max(diffs, key=lambda d: d.max_error / max(d.tolerance, 1e-30))
        rows.append(Check(op, impl, name, shape, worst.max_error / max(worst.scale, 1e-30),
                          worst.what, all(d.ok for d in diffs), time.monotonic() - start))
      except Exception as e:  # pylint: disable=broad-except  # a failing kernel is a row
        rows.append(Check(op, impl, name, shape, None, "", False,
                          time.monotonic() - start, f"{type(e).__name__}: {e}"[:300]))
      r = rows[-1]
      _log(f"correctness {op} {impl} {name}: {'pass' if r.passed else 'FAIL'} "
           f"(rel. err {r.max_error if r.max_error is None else f'{r.max_error:.2e}'}, "
           f"{r.seconds:.1f}s) {r.note}")
  return rows


# ----------------------------------------------------------------------------
# 2. Kernel timings and the auto table
# ----------------------------------------------------------------------------

def kernel_timings(platform: str, tiny: bool, deadline: float) -> list[bench.Row]:
  impls = ["xla", "pallas", "pallas_triton", "cudnn"]
  common = dict(impls=impls, passes=["fwd+bwd"] if tiny else list(bench.PASSES),
                dtype="bfloat16",
                repeats=2 if tiny else 10, max_gib=8.0, interpret=False, quick=tiny,
                json_only=False, json=None, deadline=deadline)
  if tiny:
    plans = [("global", dict(tokens=[49], batch=1, heads=2, head_dim=16)),
             ("linear", dict(tokens=[64], batch=1, heads=2, head_dim=16)),
             ("window", dict(windows=[], window_batch=1, window_configs={
                 "tiny": [(14, 14, 2, 16, 7, ("grid",), False)]}))]
  else:
    plans = [("global", dict(tokens=[197, 577, 1024], batch=32, heads=12, head_dim=64)),
             ("linear", dict(tokens=[4096, 16384], batch=4, heads=8, head_dim=64)),
             ("window", dict(windows=list(bench.WINDOW_CONFIGS), window_batch=32,
                             window_configs=None))]
  rows = []
  print(bench.HEADER)
  for op, settings in plans:
    cfg = SimpleNamespace(**common, **settings)
    rows += bench.window_rows(cfg) if op == "window" else bench.token_rows(op, cfg)
  return rows


def _op_of(row_op: str) -> str:
  return row_op.split()[0]


def auto_table_from(platform: str, checks: list[Check], rows: list[bench.Row],
                    device: str) -> dict:
  """This platform's half-precision entries: the fastest correct fwd+bwd per op.

  An implementation counts only where it was timed on every shape of the op (summed
  time) and passed every correctness row it had; XLA (the reference) always counts;
  the deprecated Triton fallback never does (its timings are for information).
  """
  data = json.loads(json.dumps(kernels.auto_table()))  # a copy
  failed = {(_op_of(c.op), c.impl.split()[0]) for c in checks if not c.passed}
  changes = {}
  for op in kernels.OPS:
    timed = [r for r in rows if r.op == op and r.passes == "fwd+bwd"]
    shapes = {r.shape for r in timed}
    totals = {}
    for impl in {r.impl for r in timed} - {"pallas_triton"}:
      mine = [r for r in timed if r.impl == impl and r.time_ms is not None]
      if len({r.shape for r in mine}) == len(shapes) and (op, impl) not in failed:
        totals[impl] = sum(r.time_ms for r in mine)
    if totals:
      best = min(totals, key=totals.get)
      data["table"][op][platform]["half"] = best
      changes[op] = {"chosen": best, "fwd+bwd ms summed over shapes": totals}
  kernels.check_auto_table(data["table"])
  data["source"] = (f"measured by `python -m vit_jax.tools.device_check` on {device}, "
                    f"{datetime.date.today().isoformat()}, jax {jax.__version__}: the "
                    f"{platform} half-precision entries (float32 entries are not measured)")
  data["device"] = device
  data["measured"] = changes
  return data


# ----------------------------------------------------------------------------
# 3 and 4. Models beside timm
# ----------------------------------------------------------------------------

def model_rows(mode: str, models_: list, tiny: bool, platform: str,
               deadline: float) -> list[benchmark.Row]:
  rows = []
  for i, (name, batch, tiny_overrides, tiny_timm) in enumerate(models_):
    if tiny and i:  # one model per stage in the smoke run: each costs a compile and a worker
      rows.append(benchmark.Row(name, mode, batch, "bfloat16", note="skipped: --tiny runs "
                                "the first model only"))
      continue
    if time.monotonic() > deadline:
      rows.append(benchmark.Row(name, mode, batch, "bfloat16", note="skipped: time box"))
      _log(f"{mode} {name}: skipped (time box)")
      continue
    _log(f"{mode} {name} ...")
    try:
      row = benchmark.benchmark(
          name, mode, batch=2 if tiny else batch, dtype="bfloat16", attention_impl="auto",
          overrides=tiny_overrides if tiny else None,
          timm_kwargs=tiny_timm if tiny else None,
          compare="timm" if platform != "tpu" else None,
          timm_impls=("eager",) if tiny else ("compile",),
          warmup=1 if tiny else 2, steps=1 if tiny else 5, repeats=2 if tiny else 5)
    except Exception as e:  # pylint: disable=broad-except  # a failure is a row
      row = benchmark.Row(name, mode, batch, "bfloat16", note=f"{type(e).__name__}: {e}"[:300])
    rows.append(row)
    _log(f"{mode} {name}: {row.images_per_s} img/s, timm {row.timm_compile_images_per_s or row.timm_eager_images_per_s} img/s {row.note}")
  return rows


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def _fmt(x, spec=".1f"):
  return "—" if x is None else format(x, spec)


def markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"### device_check: {env['device']} ({env['platform']}), jax {env['jax']}, "
           f"{env['date']}{' — TINY smoke run, not a measurement' if report['tiny'] else ''}",
           "", f"Command: `{report['command']}` (total {report['total_s']:.0f} s)", ""]
  checks = report["correctness"]
  if checks:
    lines += ["#### 1. Correctness (forward and gradients vs the reference)", "",
              "| op | impl | dtype | shape | max rel. error | worst | pass |",
              "|---|---|---|---|---|---|---|"]
    for c in checks:
      lines.append(f"| {c['op']} | {c['impl']} | {c['dtype']} | {c['shape']} | "
                   f"{_fmt(c['max_error'], '.2e')} | {c['worst']} | "
                   f"{'pass' if c['passed'] else 'FAIL'}{' — ' + c['note'] if c['note'] else ''} |")
    lines.append("")
  if report["kernels"]:
    lines += ["#### 2. Kernel timings (bfloat16, median)", "", bench.HEADER]
    for r in report["kernels"]:
      lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['passes']} | "
                   f"{_fmt(r['time_ms'], '.3f')} | {_fmt(r['tflops'], '.2f')} | "
                   f"{_fmt(r['gbps'], '.1f')} | {_fmt(r['peak_mib'])} | "
                   f"{_fmt(r['temp_mib'])} | {r['note']} |")
    measured = report.get("auto_table", {}).get("measured", {})
    lines += ["", "`impl=\"auto\"` from these timings (fwd+bwd, summed over shapes): " +
              (", ".join(f"{op} → {m['chosen']}" for op, m in measured.items()) or "—"), ""]
  for stage, title in (("training", "3. Training step"), ("inference", "4. Inference")):
    if report[stage]:
      lines += [f"#### {title} (bfloat16, beside timm)", "",
                "| model | batch | img/s | MFU | timm img/s | ours / timm | timm mode | note |",
                "|---|---|---|---|---|---|---|---|"]
      for r in report[stage]:
        timm_ips = r["timm_compile_images_per_s"] or r["timm_eager_images_per_s"]
        ratio = r["ratio_vs_timm_compile"] or r["ratio_vs_timm_eager"]
        timm_mode = ("compile" if r["timm_compile_images_per_s"] else
                     "eager" if r["timm_eager_images_per_s"] else "—")
        lines.append(f"| {r['model']} | {r['batch']} | {_fmt(r['images_per_s'])} | "
                     f"{_fmt(r['mfu'] and 100 * r['mfu'])}{'%' if r['mfu'] else ''} | "
                     f"{_fmt(timm_ips)} | "
                     f"{_fmt(ratio, '.2f')} | {timm_mode} | {r['note']} |")
      lines.append("")
  return "\n".join(lines)


def run(out: pathlib.Path, tiny: Optional[bool], budget_s: float, stages) -> dict:
  start = time.monotonic()
  platform = _backend.platform()
  tiny = platform == "cpu" if tiny is None else tiny
  device = jax.devices()[0].device_kind
  _log(f"{device} ({platform}), jax {jax.__version__}, tiny={tiny}, budget {budget_s:.0f}s")
  report = {"tiny": tiny, "command": "python -m vit_jax.tools.device_check " +
            " ".join(sys.argv[1:]), "correctness": [], "kernels": [], "training": [],
            "inference": []}
  deadline = start
  checks, timing_rows = [], []
  for stage in STAGES:
    deadline += STAGE_SHARE[stage] * budget_s
    if stage not in stages:
      continue
    _log(f"stage {stage} (until +{deadline - start:.0f}s)")
    if stage == "correctness":
      checks = correctness(platform, tiny, deadline)
      report["correctness"] = [dataclasses.asdict(c) for c in checks]
    elif stage == "kernels":
      timing_rows = kernel_timings(platform, tiny, deadline)
      report["kernels"] = [dataclasses.asdict(r) for r in timing_rows]
      report["auto_table"] = auto_table_from(platform, checks, timing_rows, device)
    elif stage == "training":
      report["training"] = [dataclasses.asdict(r) for r in model_rows(
          "train", [TRAIN_MODEL], tiny, platform, deadline)]
    else:
      report["inference"] = [dataclasses.asdict(r) for r in model_rows(
          "infer", INFER_MODELS, tiny, platform, deadline)]
  report["total_s"] = time.monotonic() - start
  report["environment"] = {
      "device": device, "platform": platform, "jax": jax.__version__,
      "python": sys.version.split()[0], "date": datetime.date.today().isoformat(),
      "heavy_modules_imported": sorted(m for m in HEAVY_MODULES if m in sys.modules)}
  out.mkdir(parents=True, exist_ok=True)
  (out / "device_check.json").write_text(json.dumps(report, indent=1))
  (out / "device_check.md").write_text(markdown(report))
  if "auto_table" in report:
    (out / "auto_table.json").write_text(json.dumps(report["auto_table"], indent=2))
  print(markdown(report))
  _log(f"done in {report['total_s']:.0f}s; wrote {out}/device_check.json, .md"
       + (", auto_table.json" if "auto_table" in report else ""))
  return report


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs: importing this module (tests, other
  tools) must not claim flag names other commands define."""
  flags.DEFINE_string("out", None, "directory for device_check.json/.md and "
                      "auto_table.json", required=True)
  flags.DEFINE_bool("tiny", None, "tiny sizes, timm eager (default: on CPU)")
  flags.DEFINE_float("budget_s", 480.0, "time box of the whole run, seconds")
  flags.DEFINE_list("stages", ["correctness", "kernels", "training", "inference"],
                    "stages to run")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  bad = sorted(set(FLAGS.stages) - set(STAGES))
  if bad:
    raise app.UsageError(f"unknown --stages {', '.join(bad)}; choose from {', '.join(STAGES)}")
  run(pathlib.Path(FLAGS.out), FLAGS.tiny, FLAGS.budget_s, FLAGS.stages)


if __name__ == "__main__":
  define_flags()
  app.run(main)
