r"""Where one compiled step spends its time: XLA's per-op profile of a benchmark program.

  python -m vit_jax.tools.profile_step --model=efficientvit_b1 --mode=train --batch=8

builds the program ``vit_jax.tools.benchmark`` times (the same train step: forward,
cross-entropy, backward, AdamW; or the inference forward), runs it ``--warmup`` times,
traces ``--steps`` steps with ``jax.profiler`` and reads the trace's XLA op events
(``tf_XLA*`` thread lines of the host plane): the time per op per step, summed over
threads, grouped by kind (``ynn_fusion.12`` -> ``ynn_fusion``), and the top ops with
their HLO instruction (shapes, operands), so a slow fusion can be traced back to the
layer that made it (``--hlo=FILE`` writes the whole compiled module). This is what
issue 25's profile of the conv-hybrid train steps was measured with.

On CPU the op times of the two compute threads add up, so their sum can exceed the
step's wall time; the shares are what to read. Under machine load every op slows, not
evenly: profile on a quiet machine before acting on small differences.
"""

import collections
import glob
import os
import re
import tempfile
from typing import Optional

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined by the command only: importing this module (the tests do, in a process
  that imports other tools) must not claim flag names such as --mode or --batch."""
  flags.DEFINE_string("model", None, "Registered model name.")
  flags.DEFINE_enum("mode", "train", ["train", "infer"], "Which program.")
  flags.DEFINE_integer("batch", 8, "Batch size.")
  flags.DEFINE_multi_string("set", [], "Model override KEY=VALUE (repeatable).")
  flags.DEFINE_integer("warmup", 2, "Untraced steps after compilation.")
  flags.DEFINE_integer("steps", 2, "Traced steps (times are per step).")
  flags.DEFINE_integer("top", 25, "How many ops to list.")
  flags.DEFINE_string("hlo", None, "Write the compiled module's HLO text here.")


def op_times(trace_dir: str, steps: int) -> dict[str, float]:
  """Milliseconds per step of each XLA op in the ``jax.profiler`` trace in ``trace_dir``."""
  # TensorFlow is a dependency already; its copy of the XPlane proto reads the trace.
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  times = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ":" not in name:  # the runtime's own events (thread pools, executor, "end: op")
          times[name] += event.duration_ps / 1e9 / steps
  return dict(times)


def hlo_lines(hlo_text: str) -> dict[str, str]:
  """Each instruction's right-hand side (metadata dropped), by name."""
  lines = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if match:
      lines.setdefault(match.group(1), re.sub(r", metadata=\{.*", "", match.group(2)))
  return lines


def by_kind(times: dict[str, float]) -> list[tuple[str, float]]:
  kinds = collections.Counter()
  for name, ms in times.items():
    kinds[re.sub(r"\.\d+$", "", name)] += ms
  return kinds.most_common()


def profile(name: str, mode: str = "train", batch: int = 8,
            overrides: Optional[dict] = None, warmup: int = 2, steps: int = 2):
  """``(step_seconds, op_times, hlo_text, compile_seconds)`` of one benchmark program."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  step, args, compiled, _, _, compile_s = benchmark.build_programs(
      name, mode, batch, dict(overrides or {}))
  for _ in range(warmup):
    _, args = benchmark.time_repeat(step, args, mode, 1)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    seconds, args = benchmark.time_repeat(step, args, mode, steps)
    jax.profiler.stop_trace()
    times = op_times(trace_dir, steps)
  return seconds, times, compiled.as_text(), compile_s


def report(seconds: float, times: dict[str, float], hlo_text: str, top: int) -> str:
  total = sum(times.values()) or 1.0
  out = [f"step {seconds * 1e3:,.1f} ms (traced); ops {total:,.1f} ms per step, "
         "summed over threads", "", "by kind:"]
  out += [f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {kind}" for kind, ms in by_kind(times)]
  out += ["", f"top {top} ops:"]
  lines = hlo_lines(hlo_text)
  for op, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    out.append(f"  {ms:9.1f} ms {100 * ms / total:5.1f}%  {op}: {lines.get(op, '?')[:200]}")
  return "\n".join(out)


def main(argv):
  del argv
  if not FLAGS.model:
    raise app.UsageError("--model is required (a registered model name)")
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  overrides = benchmark._parse_overrides(FLAGS.set)  # pylint: disable=protected-access
  seconds, times, hlo_text, compile_s = profile(
      FLAGS.model, FLAGS.mode, FLAGS.batch, overrides, FLAGS.warmup, FLAGS.steps)
  print(f"{FLAGS.model} {FLAGS.mode} batch {FLAGS.batch}: compiled in {compile_s:.1f} s")
  print(report(seconds, times, hlo_text, FLAGS.top))
  if FLAGS.hlo:
    with open(FLAGS.hlo, "w") as f:
      f.write(hlo_text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
