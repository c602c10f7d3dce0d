r"""Memory of a training step: what the remat and scan options buy.

  python -m vit_jax.tools.memory --model=vit_base_patch16_224 --batch_size=32

compiles (never runs) one training step of the model for each memory option and
prints, per option, the activations the forward pass keeps for the backward pass
(``jax.vjp``'s residuals: what remat trades for recomputation) and XLA's compiled
memory analysis: ``temp`` is the step's scratch memory (the kept activations as the
compiler schedules them, and the backward pass's own buffers); ``args`` the
parameters, optimizer state and batch it is given. Nothing is allocated, so
full-size models are fine on a laptop. Compiled numbers are per device and depend on
the backend: GPU and TPU compilers schedule (and rematerialise) differently from CPU.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from vit_jax import models

# Options compared by the command line: model overrides.
OPTIONS = {
    "default": {},
    "remat full": {"remat_policy": "full"},
    "remat dots_saveable": {"remat_policy": "dots_saveable"},
    "scan": {"scan_layers": True},
    "scan + remat full": {"scan_layers": True, "remat_policy": "full"},
    "scan + remat dots_saveable": {"scan_layers": True, "remat_policy": "dots_saveable"},
}


def train_step_memory(model_name: str, batch_size: int, *,
                      tx: Optional[optax.GradientTransformation] = None,
                      **overrides) -> dict[str, int]:
  """Bytes of XLA's compiled memory analysis of one SGD training step (float32).

  Returns ``temp``, ``args``, ``output`` and ``alias`` (outputs that reuse donated
  inputs) in bytes.
  """
  model = models.create(model_name, **overrides)
  shape = models.input_shape(model_name, batch=batch_size, **overrides)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  tx = tx or optax.sgd(0.1, momentum=0.9)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1,) + shape[1:], jnp.float32))["params"]
  opt_state = jax.eval_shape(tx.init, params)

  def step(params: Any, opt_state: Any, images, labels):
    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True,
                           rngs={"dropout": jax.random.key(0)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, images, labels).compile()
  stats = compiled.memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "args": stats.argument_size_in_bytes,
          "output": stats.output_size_in_bytes, "alias": stats.alias_size_in_bytes}


def activation_bytes(model_name: str, batch_size: int, **overrides) -> int:
  """Bytes of activations the forward pass keeps for the backward pass.

  What ``jax.vjp`` holds on to (its residuals), minus the parameters it also holds:
  this is what remat policies trade for recomputation, measured before the compiler
  schedules anything (so it is the same on every backend).
  """
  model = models.create(model_name, **overrides)
  shape = models.input_shape(model_name, batch=batch_size, **overrides)
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1,) + shape[1:], jnp.float32))["params"]

  def residuals(params, images):
    forward = lambda p: model.apply({"params": p}, images, train=True,
                                    rngs={"dropout": jax.random.key(0)})
    return jax.tree.leaves(jax.vjp(forward, params)[1])

  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return nbytes(jax.eval_shape(residuals, params, images)) - nbytes(params)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("model", "vit_base_patch16_224", "Registered model name.")
  flags.DEFINE_integer("batch_size", 32, "Images per step (per device).")
  flags.DEFINE_list("options", list(OPTIONS), "Which options to compile.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = [name for name in FLAGS.options if name not in OPTIONS]
  if unknown:
    raise app.UsageError(f"--options: unknown {unknown}; choose from {list(OPTIONS)}")
  print(f"{FLAGS.model}, batch {FLAGS.batch_size}, SGD-momentum step on "
        f"{jax.devices()[0].platform}; MiB per device")
  print("| option | kept activations | compiled temp | compiled args |\n"
        "|---|---:|---:|---:|")
  for name in FLAGS.options:
    kept = activation_bytes(FLAGS.model, FLAGS.batch_size, **OPTIONS[name])
    stats = train_step_memory(FLAGS.model, FLAGS.batch_size, **OPTIONS[name])
    print(f"| {name} | {kept / 2**20:,.0f} | {stats['temp'] / 2**20:,.0f} | "
          f"{stats['args'] / 2**20:,.0f} |", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
