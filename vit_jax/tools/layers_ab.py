r"""Our models with the shared layers' fast paths against what they replaced, in one process.

  python -m vit_jax.tools.layers_ab --model=pvt_v2_b0,poolformerv2_s12 --mode=train \
      --swap=norms,gelu --batch=8

Builds each model's program twice in one process (as it is, then with the ``--swap``
layers put back to what they replaced) and times them interleaved (ours, before, ours,
...), so a loaded machine slows both alike. Prints step times, the speed-up and both
compile times. Timing and programs are ``vit_jax.tools.benchmark``'s. What can be
swapped (``SWAPS``):

- ``depthwise``: ``depthwise_conv``'s ``"shift"`` path -> XLA's grouped convolution
  (``feature_group_count``), the code before issue 25;
- ``norms``: ``layers.LayerNorm`` / ``GroupNorm`` (``models/norms.py``, the
  hand-written backward) -> Flax's;
- ``gelu``: ``layers.gelu`` (erf) -> ``jax.nn.gelu`` (erfc);
- ``gelu_derivative``: ``layers.exact_gelu``'s written-out derivative -> the one
  ``jax.grad`` derives;
- ``fusion_barrier``: ``layers.outside_product_fusion`` after GELU and StarReLU ->
  nothing (XLA:CPU fuses them into the next matrix product again);
- ``dense``: ``layers.Dense`` / ``DenseGeneral`` and the ungrouped 1x1 ``layers.Conv``
  (``models/linear.py``, 2-D products on CPU) -> Flax's ``lax.dot_general`` on the
  unflattened operands.

The swap happens when the model is traced, by rebinding the names the families look up
then; a family that bound one of them at import (ViG-H's stem GELU) keeps ours.

  python -m vit_jax.tools.layers_ab --layers --swap=depthwise,norms,gelu

times the layers alone (forward, and forward + backward), both versions interleaved, a
Markdown table row per shape: the depthwise convolution at the shapes of the five
models issue 25 names (``LAYERS``, ``xla / shift`` milliseconds), the others at the
shapes of the train-step misses (``SHARED_LAYERS``, ``before / ours``).
"""

import contextlib
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


# (swap, where it occurs, shape, what), batch 8: the shapes behind the profiles of
# issue 25's train-step misses.
SHARED_LAYERS = [
    ("norms", "LayerNorm, GC ViT-XXT stem", (8, 112, 112, 64), "layer_norm"),
    ("norms", "LayerNorm, PVT v2-b0 stage 1 tokens", (8, 3136, 32), "layer_norm"),
    ("norms", "LayerNorm, ViT-Ti tokens", (8, 197, 192), "layer_norm"),
    ("norms", "GroupNorm (1 group), PoolFormer v2-S12 stage 1", (8, 56, 56, 64),
     "group_norm"),
    ("gelu", "GELU, PVT v2-b0 MLP stage 1", (8, 56, 56, 256), "gelu"),
    ("gelu", "GELU, ViT-Ti MLP", (8, 197, 768), "gelu"),
    ("dense", "Dense 192->768, ViT-Ti MLP", (8, 197, 192), "dense:768"),
    ("dense", "Dense 768->192, ViT-Ti MLP", (8, 197, 768), "dense:192"),
    ("dense", "attention output, ViT-Ti (3 heads x 64)", (8, 197, 3, 64), "out:192"),
    ("dense", "Dense 32->256, PVT v2-b0 MLP stage 1", (8, 3136, 32), "dense:256"),
    ("dense", "Dense 96->384, Swin-T MLP stage 1", (8, 56, 56, 96), "dense:384"),
    ("dense", "1x1 conv 64->256, EfficientViT-B0 stage 2", (8, 28, 28, 64), "conv1x1:256"),
]


def _shared_layer(what: str):
  """``f(variables, x)`` built from the names in ``layers`` as they are now."""
  from vit_jax.models import layers  # pylint: disable=g-import-not-at-top

  if what == "gelu":
    gelu = layers.gelu
    return lambda v, x: gelu(x), None
  if ":" in what:  # dense:N, out:N (axes -2, -1), conv1x1:N
    kind, features = what.split(":")
    module = {"dense": lambda: layers.Dense(int(features)),
              "out": lambda: layers.DenseGeneral(int(features), axis=(-2, -1)),
              "conv1x1": lambda: layers.Conv(int(features), (1, 1))}[kind]()
    return module.apply, module.init
  module = (layers.LayerNorm(epsilon=1e-6) if what == "layer_norm"
            else layers.GroupNorm(num_groups=1, epsilon=1e-6))
  return module.apply, module.init


def _traced_within(names, f):
  def traced(*args):
    with swapped(names):
      return f(*args)
  return traced


def time_shared_layers(swaps, repeats: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  print("| layer | shape | fwd ms before / ours | fwd+bwd ms before / ours |\n"
        "|---|---|---|---|")
  rng = np.random.default_rng(0)
  for swap, label, shape, what in SHARED_LAYERS:
    if swap not in swaps:
      continue
    x = jnp.asarray(rng.standard_normal(shape, np.float32) * 2 + 1)
    fns, variables = {}, {}
    for version in ("ours", "before"):
      names = (swap,) if version == "before" else ()
      with swapped(names):
        f, init = _shared_layer(what)
      f = _traced_within(names, f)  # 1x1 convs look the product up when traced
      variables[version] = init(jax.random.PRNGKey(0), x) if init else {}
      # The output's cotangent is an argument: a constant one lets XLA transpose it
      # while compiling, hiding the layout copies a real backward pays.
      cotangent = jnp.asarray(rng.standard_normal(jax.eval_shape(
          f, variables[version], x).shape, np.float32))
      fns[version, "fwd"] = jax.jit(lambda v, x, g, f=f: f(v, x))
      fns[version, "bwd"] = jax.jit(jax.grad(
          lambda v, x, g, f=f: jnp.sum(f(v, x) * g), (0, 1)))
    for (version, _), fn in fns.items():
      jax.block_until_ready(fn(variables[version], x, cotangent))
    times = {key: [] for key in fns}
    for _ in range(repeats):  # interleaved
      for (version, part), fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(variables[version], x, cotangent))
        times[version, part].append(time.perf_counter() - start)
    ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    cell = lambda p: (f"{ms['before', p]:.2f} / {ms['ours', p]:.2f} "
                      f"({ms['before', p] / ms['ours', p]:.2f}x)")
    print(f"| {label} | {'x'.join(map(str, shape))} | {cell('fwd')} | {cell('bwd')} |")
    sys.stdout.flush()


def _flax_gelu(x, approximate=False):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.gelu(x, approximate=approximate)


SWAPS = ("depthwise", "norms", "gelu", "gelu_derivative", "fusion_barrier", "dense")


@contextlib.contextmanager
def swapped(names):
  """Inside: the named shared layers are what they replaced (see the module doc)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from vit_jax.models import depthwise, layers, linear  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(names) - set(SWAPS))
  if unknown:
    raise ValueError(f"--swap: unknown {unknown}; choose from {SWAPS}")
  targets = {"depthwise": [(depthwise, "_shift_conv", depthwise._xla_conv)],  # pylint: disable=protected-access
             "norms": [(layers, "LayerNorm", nn.LayerNorm),
                       (layers, "GroupNorm", nn.GroupNorm)],
             "gelu": [(layers, "gelu", _flax_gelu)],
             "gelu_derivative": [(layers, "exact_gelu", layers._exact_gelu)],  # pylint: disable=protected-access
             "fusion_barrier": [(layers, "outside_product_fusion", lambda y: y)],
             "dense": [(layers, "Dense", nn.Dense), (layers, "DenseGeneral", nn.DenseGeneral),
                       (linear, "dot_general", lax.dot_general)]}
  saved = []
  try:
    for name in names:
      for module, attribute, replacement in targets[name]:
        saved.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, replacement)
    yield
  finally:
    for module, attribute, original in reversed(saved):
      setattr(module, attribute, original)


def main(argv):
  del argv
  if FLAGS.layers:
    whole_program = sorted({"fusion_barrier", "gelu_derivative"} & set(FLAGS.swap))
    if whole_program:
      raise app.UsageError(f"--swap={','.join(whole_program)}: measured in whole programs; "
                           "time it with --model, not --layers")
    if "depthwise" in FLAGS.swap:
      time_layers(FLAGS.repeats)
    if set(FLAGS.swap) - {"depthwise"}:
      time_shared_layers(FLAGS.swap, FLAGS.repeats)
    return
  from vit_jax.tools import benchmark  # pylint: disable=g-import-not-at-top

  for name in FLAGS.model:
    for mode in FLAGS.mode:
      programs = {}
      for version in ("ours", "before"):
        with swapped(FLAGS.swap if version == "before" else ()):
          step, args, *_, compile_s = benchmark.build_programs(name, mode, FLAGS.batch, {})
        for _ in range(FLAGS.warmup):
          _, args = benchmark.time_repeat(step, args, mode, 1)
        programs[version] = [step, args, compile_s, []]
      for _ in range(FLAGS.repeats):
        for version, p in programs.items():
          seconds, p[1] = benchmark.time_repeat(p[0], p[1], mode, FLAGS.steps)
          p[3].append(seconds)
      ms = {version: statistics.median(p[3]) * 1e3 for version, p in programs.items()}
      print(f"{name} {mode} batch={FLAGS.batch} swap={','.join(FLAGS.swap)}: ours "
            f"{ms['ours']:.1f} ms (compile {programs['ours'][2]:.0f} s), before "
            f"{ms['before']:.1f} ms (compile {programs['before'][2]:.0f} s), speed-up "
            f"{ms['before'] / ms['ours']:.2f}x; repeats ours "
            + " ".join(f"{t * 1e3:.0f}" for t in programs["ours"][3]) + ", before "
            + " ".join(f"{t * 1e3:.0f}" for t in programs["before"][3]))
      sys.stdout.flush()


if __name__ == "__main__":
  flags.DEFINE_list("model", [], "Registered model name(s).")
  flags.DEFINE_bool("layers", False, "Time the swapped layers alone (at the shapes "
                    "of LAYERS and SHARED_LAYERS) instead of whole models.")
  flags.DEFINE_list("mode", ["infer", "train"], "infer, train, or both.")
  flags.DEFINE_list("swap", ["depthwise"], f"What to put back in 'before': {SWAPS}.")
  flags.DEFINE_integer("batch", 8, "Batch size.")
  flags.DEFINE_integer("warmup", 1, "Steps after compilation, not timed.")
  flags.DEFINE_integer("steps", 2, "Steps per timed repeat.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
  app.run(main)
