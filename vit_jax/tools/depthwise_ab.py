r"""Our models with the shared depthwise conv as ``"shift"`` vs XLA's grouped conv.

  python -m vit_jax.tools.depthwise_ab --model=efficientvit_m3,pvt_v2_b1 \
      --mode=infer,train --batch=8

Builds each model's program twice in one process (``depthwise_conv``'s ``"shift"``
path, then the same model with XLA's ``feature_group_count`` convolution, the code
before issue 25) and times them interleaved (shift, xla, shift, ...), so a loaded
machine slows both alike. Prints step times, the speed-up and both compile times.
Timing and programs are ``vit_jax.tools.benchmark``'s.

  python -m vit_jax.tools.depthwise_ab --layers

times the convolution alone (forward, and forward + backward of a squared-sum loss)
at the depthwise shapes of the five models issue 25 names, batch 8, both paths
interleaved: a Markdown table row per shape, ``xla / shift`` milliseconds.
"""

import functools
import statistics
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS

# (where it occurs, spatial size, channels, kernel, stride), batch 8, "SAME" padding.
LAYERS = [
    ("maxvit_tiny MBConv stage 1 (stride 2)", 112, 256, 3, 2),
    ("maxvit_tiny MBConv stage 2", 28, 512, 3, 1),
    ("efficientvit_b1 MBConv stage 2", 28, 256, 3, 1),
    ("efficientvit_b1 aggregation 5x5 stage 3", 14, 384, 5, 1),
    ("pvt_v2_b1 MLP stage 1", 56, 512, 3, 1),
    ("convformer_s18 sepconv stage 1 (7x7)", 56, 128, 7, 1),
    ("efficientvit_m3 token interaction stage 1", 14, 128, 3, 1),
]


def time_layers(repeats: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.models.depthwise import depthwise_conv  # pylint: disable=g-import-not-at-top

  print("| layer | shape | fwd ms xla / shift | fwd+bwd ms xla / shift |\n|---|---|---|---|")
  rng = np.random.default_rng(0)
  for label, size, channels, k, stride in LAYERS:
    x = jnp.asarray(rng.standard_normal((8, size, size, channels), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, channels), np.float32) * 0.1)
    fns = {}
    for impl in ("shift", "xla"):
      f = functools.partial(depthwise_conv, strides=stride, padding="SAME", impl=impl)
      fns[impl, "fwd"] = jax.jit(f)
      fns[impl, "bwd"] = jax.jit(jax.grad(
          lambda x, w, f=f: jnp.sum(f(x, w) ** 2), (0, 1)))
    for fn in fns.values():
      jax.block_until_ready(fn(x, w))
    times = {key: [] for key in fns}
    for _ in range(repeats):  # interleaved
      for key, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(x, w))
        times[key].append(time.perf_counter() - start)
    ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    cell = lambda p: (f"{ms['xla', p]:.1f} / {ms['shift', p]:.1f} "
                      f"({ms['xla', p] / ms['shift', p]:.0f}x)")
    print(f"| {label} | 8x{size}x{size}x{channels}, {k}x{k}, stride {stride} | "
          f"{cell('fwd')} | {cell('bwd')} |")
    sys.stdout.flush()


def main(argv):
  del argv
  if FLAGS.layers:
    time_layers(FLAGS.repeats)
    return
  from vit_jax.models import depthwise  # pylint: disable=g-import-not-at-top
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top

  shift = depthwise._shift_conv  # pylint: disable=protected-access
  for name in FLAGS.model:
    for mode in FLAGS.mode:
      programs = {}
      for impl in ("shift", "xla"):
        # The choice is made when the model is traced: swap the implementation then.
        depthwise._shift_conv = (shift if impl == "shift"  # pylint: disable=protected-access
                                 else depthwise._xla_conv)  # pylint: disable=protected-access
        try:
          step, args, *_, compile_s = benchmark.build_programs(name, mode, FLAGS.batch, {})
        finally:
          depthwise._shift_conv = shift  # pylint: disable=protected-access
        for _ in range(FLAGS.warmup):
          _, args = benchmark.time_repeat(step, args, mode, 1)
        programs[impl] = [step, args, compile_s, []]
      for _ in range(FLAGS.repeats):
        for impl, p in programs.items():
          seconds, p[1] = benchmark.time_repeat(p[0], p[1], mode, FLAGS.steps)
          p[3].append(seconds)
      ms = {impl: statistics.median(p[3]) * 1e3 for impl, p in programs.items()}
      print(f"{name} {mode} batch={FLAGS.batch}: shift {ms['shift']:.1f} ms "
            f"(compile {programs['shift'][2]:.0f} s), xla {ms['xla']:.1f} ms "
            f"(compile {programs['xla'][2]:.0f} s), speed-up "
            f"{ms['xla'] / ms['shift']:.2f}x; repeats shift "
            + " ".join(f"{t * 1e3:.0f}" for t in programs["shift"][3]) + ", xla "
            + " ".join(f"{t * 1e3:.0f}" for t in programs["xla"][3]))
      sys.stdout.flush()


if __name__ == "__main__":
  flags.DEFINE_list("model", [], "Registered model name(s).")
  flags.DEFINE_bool("layers", False, "Time the depthwise convolution alone at the "
                    "five models' shapes instead of whole models.")
  flags.DEFINE_list("mode", ["infer", "train"], "infer, train, or both.")
  flags.DEFINE_integer("batch", 8, "Batch size.")
  flags.DEFINE_integer("warmup", 1, "Steps after compilation, not timed.")
  flags.DEFINE_integer("steps", 2, "Steps per timed repeat.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
  app.run(main)
