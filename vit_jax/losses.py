"""Contrastive image-text losses: InfoNCE (CLIP) and sigmoid (SigLIP), sharded or not;
and the DeiT distillation term (``distillation_loss``, used by the classification
trainer and by the early-exit heads' self-distillation).

Inputs are L2-normalised embeddings ``zimg``, ``ztxt`` ``[batch, dim]`` whose rows
pair up, the log-temperature ``logit_scale`` and an optional ``logit_bias``; logits
are ``exp(logit_scale) * zimg @ ztxt.T + logit_bias``.

  clip_loss     mean of the cross-entropies image->text and text->image, the diagonal
                being the targets (Radford et al., 2021)
  siglip_loss   -sum(log_sigmoid(z * logits)) / batch with z = +1 on the diagonal and
                -1 elsewhere (Zhai et al., 2023)

The ``sharded_*`` versions give the same numbers (and gradients) when the batch is
split over the devices of a mesh, with memory linear in the batch:

  InfoNCE  every device gathers all embeddings and scores its own rows against every
           column, in both directions ("local loss"); the cross-entropies are summed
           over devices.
  SigLIP   no gather: each device keeps its images and passes its text embeddings
           around the ring of devices (``ppermute``), scoring one block per hop; the
           block can be cut into chunks that are recomputed in the backward pass, so
           the logits held at once are ``local_batch x chunk_size``.

Both return ``(loss, metrics)``; ``metrics["batch_accuracy"]`` is the fraction of
images whose own caption scores highest among all captions of the global batch.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vit_jax import sharding as sharding_lib

Array = jax.Array
LOSSES = ("clip", "siglip")


def _logits(zimg: Array, ztxt: Array, logit_scale: Array,
            logit_bias: Optional[Array]) -> Array:
  logits = jnp.exp(logit_scale) * jnp.einsum("id,td->it", zimg, ztxt)
  return logits if logit_bias is None else logits + logit_bias


# ---------------------------------------------------------------- single device

def clip_loss(zimg: Array, ztxt: Array, logit_scale: Array,
              logit_bias: Optional[Array] = None) -> tuple[Array, dict]:
  logits = _logits(zimg, ztxt, logit_scale, logit_bias)
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  loss = (i2t.mean() + t2i.mean()) / 2
  return loss, {"batch_accuracy": jnp.mean(jnp.argmax(logits, 1) == labels)}


def siglip_loss(zimg: Array, ztxt: Array, logit_scale: Array,
                logit_bias: Array) -> tuple[Array, dict]:
  logits = _logits(zimg, ztxt, logit_scale, logit_bias)
  z = 2 * jnp.eye(logits.shape[0]) - 1
  loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]
  labels = jnp.arange(logits.shape[0])
  accuracy = jnp.mean(jnp.argmax(logits, 1) == labels)
  return loss, {"batch_accuracy": accuracy}


# ---------------------------------------------------------------- sharded

def _axes(axes: Sequence[str]):
  return tuple(axes) if len(axes) > 1 else axes[0]


def _sharded(fn, mesh: Mesh, in_specs, out_specs):
  """``shard_map`` that also takes arrays not yet laid out as ``in_specs`` say.

  Under ``jit`` over an Auto mesh XLA moves the inputs itself; an Explicit mesh wants
  them resharded first. The jit is inlined when the caller is already under jit.
  """
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

  def call(*args):
    if explicit:
      args = [jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
    return mapped(*args)

  return jax.jit(call)


def _local_batch(batch: int, mesh: Mesh, axes: Sequence[str]) -> int:
  devices = 1
  for axis in axes:
    devices *= mesh.shape[axis]
  if batch % devices:
    raise ValueError(f"batch of {batch} cannot be split over the {devices} devices of "
                     f"mesh axes {tuple(axes)}")
  return batch // devices


def sharded_clip_loss(zimg: Array, ztxt: Array, logit_scale: Array,
                      logit_bias: Optional[Array] = None, *, mesh: Mesh,
                      axes: Sequence[str] = sharding_lib.BATCH_AXES) -> tuple[Array, dict]:
  """``clip_loss`` of a batch split over ``axes`` of ``mesh``: local rows, global columns."""
  axis = _axes(axes)
  has_bias = logit_bias is not None

  def local(zimg, ztxt, logit_scale, *bias):
    n = zimg.shape[0]
    bias = bias[0] if has_bias else None
    # Gathering is differentiable: its transpose sums each column's gradient back
    # onto the device that owns it.
    all_txt = jax.lax.all_gather(ztxt, axis, tiled=True)
    all_img = jax.lax.all_gather(zimg, axis, tiled=True)
    labels = jax.lax.axis_index(axis) * n + jnp.arange(n)
    i2t = _logits(zimg, all_txt, logit_scale, bias)  # [local, global]
    t2i = _logits(ztxt, all_img, logit_scale, bias)
    total = (optax.softmax_cross_entropy_with_integer_labels(i2t, labels).sum() +
             optax.softmax_cross_entropy_with_integer_labels(t2i, labels).sum())
    hits = jnp.sum(jnp.argmax(i2t, 1) == labels)
    global_batch = n * jax.lax.axis_size(axis)
    loss = jax.lax.psum(total, axis) / (2 * global_batch)
    return loss, {"batch_accuracy": jax.lax.psum(hits, axis) / global_batch}

  _local_batch(zimg.shape[0], mesh, axes)
  args = (zimg, ztxt, logit_scale) + ((logit_bias,) if has_bias else ())
  specs = (P(axis), P(axis), P()) + ((P(),) if has_bias else ())
  return _sharded(local, mesh, specs, (P(), {"batch_accuracy": P()}))(*args)


def sharded_siglip_loss(zimg: Array, ztxt: Array, logit_scale: Array, logit_bias: Array,
                        *, mesh: Mesh, axes: Sequence[str] = sharding_lib.BATCH_AXES,
                        chunk_size: Optional[int] = None) -> tuple[Array, dict]:
  """``siglip_loss`` of a batch split over ``axes``: text embeddings travel the ring.

  ``chunk_size`` (dividing the per-device batch) bounds the logits computed at once to
  ``local_batch x chunk_size``; each chunk is recomputed in the backward pass.
  """
  axis = _axes(axes)
  n = _local_batch(zimg.shape[0], mesh, axes)
  chunk = chunk_size or n
  if n % chunk:
    raise ValueError(f"siglip chunk_size={chunk} must divide the per-device batch {n}")

  def local(zimg, ztxt, logit_scale, logit_bias):
    num_devices = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)

    @jax.checkpoint
    def chunk_terms(txt_chunk, positive_rows):
      """Sum of the log-sigmoid terms of ``[n, chunk]`` logits, and their row maxima.

      ``positive_rows[j]`` is the image row paired with text j of the chunk, or -1.
      """
      logits = _logits(zimg, txt_chunk, logit_scale, logit_bias)
      z = jnp.where(jnp.arange(n)[:, None] == positive_rows[None, :], 1.0, -1.0)
      return jnp.sum(jax.nn.log_sigmoid(z * logits)), jnp.max(logits, axis=1)

    def block_terms(txt, owner):
      """This device's images against the text block of device ``owner``."""
      positive = jnp.where(owner == me, jnp.arange(n), -1)
      chunks = txt.reshape(n // chunk, chunk, -1)
      rows = positive.reshape(n // chunk, chunk)
      terms, row_max = jax.lax.map(lambda c: chunk_terms(*c), (chunks, rows))
      return jnp.sum(terms), jnp.max(row_max, axis=0)

    # Hop k: the text block of device (me - k) mod num_devices has arrived.
    ring = [(j, (j + 1) % num_devices) for j in range(num_devices)]

    def hop(k, carry):
      total, row_max, txt = carry
      txt = jax.lax.ppermute(txt, axis, ring)
      terms, block_max = block_terms(txt, (me - k) % num_devices)
      return total + terms, jnp.maximum(row_max, block_max), txt

    total, row_max = block_terms(ztxt, me)
    total, row_max, _ = jax.lax.fori_loop(1, num_devices, hop, (total, row_max, ztxt))
    global_batch = n * num_devices
    loss = -jax.lax.psum(total, axis) / global_batch
    positive = jnp.exp(logit_scale) * jnp.sum(zimg * ztxt, axis=1) + logit_bias
    hits = jax.lax.stop_gradient(jnp.sum(positive >= row_max))
    return loss, {"batch_accuracy": jax.lax.psum(hits, axis) / global_batch}

  return _sharded(local, mesh, (P(axis), P(axis), P(), P()),
                  (P(), {"batch_accuracy": P()}))(zimg, ztxt, logit_scale, logit_bias)


def contrastive_loss(kind: str, zimg: Array, ztxt: Array, logit_scale: Array,
                     logit_bias: Optional[Array] = None, *, mesh: Optional[Mesh] = None,
                     axes: Sequence[str] = sharding_lib.BATCH_AXES,
                     chunk_size: Optional[int] = None) -> tuple[Array, dict]:
  """Dispatches on ``kind`` ("clip" or "siglip"); sharded when a mesh is given."""
  if kind not in LOSSES:
    raise ValueError(f"unknown contrastive loss {kind!r}; use one of {', '.join(LOSSES)}")
  if kind == "siglip" and logit_bias is None:
    raise ValueError("the siglip loss needs a logit bias: create the model with "
                     "logit_bias_init (e.g. -10)")
  if mesh is None:
    fn = clip_loss if kind == "clip" else siglip_loss
    return fn(zimg, ztxt, logit_scale, logit_bias)
  if kind == "clip":
    return sharded_clip_loss(zimg, ztxt, logit_scale, logit_bias, mesh=mesh, axes=axes)
  return sharded_siglip_loss(zimg, ztxt, logit_scale, logit_bias, mesh=mesh, axes=axes,
                             chunk_size=chunk_size)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, kind: str,
                      tau: float) -> jax.Array:
  """The DeiT distillation term D, a scalar (see ``vit_jax/trainers/distillation.py``):
  ``kind`` "hard" (cross-entropy on the teacher's argmax) or "soft" (KL at ``tau``)."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  if kind == "hard":
    return optax.softmax_cross_entropy_with_integer_labels(
        student_logits, jnp.argmax(teacher_logits, axis=-1)).mean()
  log_p_teacher = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return tau ** 2 * kl.mean()
