r"""Mixed-resolution training on the digits: NaViT packing vs a fixed-resolution ViT.

  python -m vit_jax.tools.naflex_digits --epochs=20

Every training image is drawn, each epoch, at a random size: sides from 16 to 48
pixels (multiples of the patch size 8), aspect ratios 1:2 to 2:1 (4 to 36 patches).
One ViT (``gap`` pooling, 4x4 stored position table) trains on them as NaViT packs
(``vit_jax.data.packing``: ``--seq_len`` tokens, up to ``--images_per_pack`` images,
block-diagonal attention); a second, same-sized ViT trains on the same images resized
to a fixed 32x32 (the baseline). Both are evaluated on the 360 test digits at 32x32
and at random mixed sizes (the fixed model through ``naflex(model)``: same parameters).

Throughput, same process and same model: train steps on packs vs train steps where
each image is padded to the largest size (36 tokens, one image per sequence, padding
masked), in images per second. Prints one JSON line.

Written here rather than in the classification trainer: the packing is a greedy,
host-side numpy step over a stream of variable-size images (``packing.pack_stream``),
which the trainer's tf.data pipeline of fixed-size batches does not express.
"""

import json
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_integer("epochs", 20, "Passes over the 1,437 training digits.")
  flags.DEFINE_integer("seq_len", 64, "Tokens per pack.")
  flags.DEFINE_integer("images_per_pack", 8, "Image slots per pack.")
  flags.DEFINE_integer("packs_per_batch", 16, "Packs per packed train step.")
  flags.DEFINE_integer("batch_size", 64, "Images per fixed-resolution / padded step.")
  flags.DEFINE_integer("timing_steps", 20, "Steps timed per method.")
  flags.DEFINE_integer("seed", 0, "Seed of the sizes, the order and the init.")


PATCH, MIN_SIDE, MAX_SIDE, FIXED = 8, 16, 48, 32
SIDES = tuple(range(MIN_SIDE, MAX_SIDE + 1, PATCH))
MAX_TOKENS = (MAX_SIDE // PATCH) ** 2


def random_size(rng) -> tuple[int, int]:
  """Sides in SIDES with an aspect ratio between 1:2 and 2:1."""
  while True:
    h, w = rng.choice(SIDES, 2)
    if 0.5 <= h / w <= 2.0:
      return int(h), int(w)


def resize(image, size):
  """An 8x8 digit (0..16) -> ``[h, w, 1]`` float32 in [-1, 1], bilinear (PIL)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = size
  out = Image.fromarray(np.asarray(image, np.float32) / 8.0 - 1.0, mode="F").resize(
      (w, h), Image.BILINEAR)
  return np.asarray(out, np.float32)[..., None]


def make_model(num_classes: int = 10):
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  return models.create("vit_tiny_patch16_224", image_size=FIXED, patch_size=PATCH,
                       classifier="gap", hidden_size=64, num_layers=4, num_heads=4,
                       mlp_dim=256, num_classes=num_classes)


def run(epochs: int = 20, seq_len: int = 64, images_per_pack: int = 8,
        packs_per_batch: int = 16, batch_size: int = 64, timing_steps: int = 20,
        seed: int = 0, log=print) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vit_jax.data import digit_pool, packing  # pylint: disable=g-import-not-at-top
  from vit_jax.models import naflex  # pylint: disable=g-import-not-at-top

  train_x, train_y, test_x, test_y = digit_pool.digits_split()
  model = make_model()
  packed_model = naflex.naflex(model)

  def mixed_examples(images, labels, rng):
    for image, label in zip(images, labels):
      example = packing.patchify(resize(image, random_size(rng)), PATCH)
      yield {**example, "label": np.int32(label)}

  def packed_loss(params, batch):
    logits = packed_model.apply({"params": params}, batch)  # [B, K, classes]
    valid = batch["label"] >= 0  # empty slots have label -1
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.maximum(batch["label"], 0))
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)

  def fixed_loss(params, batch):
    logits = model.apply({"params": params}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  def make_step(loss_fn, tx):
    @jax.jit
    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  def packed_batches(images, labels, rng, packs, seq, slots):
    order = rng.permutation(len(images))
    return packing.pack_stream(mixed_examples(images[order], labels[order], rng),
                               seq_len=seq, images_per_pack=slots, batch_size=packs,
                               extra_keys=("label",))

  def fixed_batches(rng):
    order = rng.permutation(len(train_x))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield {"image": np.stack([resize(train_x[i], (FIXED, FIXED)) for i in idx]),
             "label": train_y[idx].astype(np.int32)}

  init = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, FIXED, FIXED, 1)))
  steps_per_epoch = {"packed": None, "fixed": len(train_x) // batch_size}
  # Packed steps hold a varying number of images; the schedule counts steps of an
  # epoch measured once (the same draw of sizes as the first epoch's).
  steps_per_epoch["packed"] = sum(1 for _ in packed_batches(
      train_x, train_y, np.random.default_rng(seed), packs_per_batch, seq_len,
      images_per_pack))
  results = {"epochs": epochs, "patch_size": PATCH, "sides": list(SIDES),
             "seq_len": seq_len, "images_per_pack": images_per_pack}

  def train(name, loss_fn, batches_fn):
    total = epochs * steps_per_epoch[name]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, min(100, total // 10), total)
    tx = optax.adamw(schedule, weight_decay=0.05)
    step = make_step(loss_fn, tx)
    params = init["params"]
    opt_state = tx.init(params)
    started, images, tokens, real = time.perf_counter(), 0, 0, 0
    for epoch in range(epochs):
      for batch in batches_fn(np.random.default_rng((seed, epoch))):
        params, opt_state, loss = step(params, opt_state, batch)
        if name == "packed":
          images += int(np.sum(batch["label"] >= 0))
          tokens += batch["segment_ids"].size
          real += int(np.sum(batch["segment_ids"] > 0))
        else:
          images += len(batch["label"])
      log(f"{name} epoch {epoch + 1}/{epochs}: loss {float(loss):.3f} "
          f"({images} images, {time.perf_counter() - started:.0f}s)")
    if name == "packed":
      results["packing_efficiency"] = real / tokens
      results["packed_images_per_step"] = images / (epochs * steps_per_epoch[name])
    return params

  packed_params = train("packed", packed_loss, lambda r: packed_batches(
      train_x, train_y, r, packs_per_batch, seq_len, images_per_pack))
  fixed_params = train("fixed", fixed_loss, fixed_batches)

  # ---------------------------------------------------------------- accuracy
  fixed_apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  packed_apply = jax.jit(lambda p, x: packed_model.apply({"params": p}, x))

  def accuracy_fixed(params):
    images = np.stack([resize(x, (FIXED, FIXED)) for x in test_x])
    return float(np.mean(np.argmax(fixed_apply(params, images), -1) == test_y))

  # Every test image once, alone in its sequence (the same sizes for every model).
  test_packs = [packing.pack([e], MAX_TOKENS, 1, ("label",)) for e in mixed_examples(
      test_x, test_y, np.random.default_rng(seed + 1000))]
  test_batch = {k: np.stack([p[k] for p in test_packs]) for k in test_packs[0]}

  def accuracy_mixed(params):
    pred = np.argmax(packed_apply(params, test_batch)[:, 0], -1)
    return float(np.mean(pred == test_batch["label"][:, 0]))

  for name, params in (("packed", packed_params), ("fixed", fixed_params)):
    results[f"{name}_trained/acc_fixed32"] = accuracy_fixed(params)
    results[f"{name}_trained/acc_mixed"] = accuracy_mixed(params)
  results["test_images"] = len(test_y)

  # ---------------------------------------------------------------- throughput
  # The same images, the same model and optimizer: packs vs one image per sequence
  # padded to MAX_TOKENS (every image padded to the largest size), timed alternately.
  tx = optax.adamw(1e-4)
  stream_rng = np.random.default_rng(seed + 2)
  packed_set = list(packed_batches(train_x, train_y, stream_rng, packs_per_batch,
                                   seq_len, images_per_pack))[:timing_steps]
  padded_set = list(packed_batches(train_x, train_y, np.random.default_rng(seed + 2),
                                   batch_size, MAX_TOKENS, 1))[:timing_steps]
  timings = {}
  for name, batches in (("packed", packed_set), ("padded", padded_set)):
    step = make_step(packed_loss, tx)
    params, opt_state = packed_params, tx.init(packed_params)
    params, opt_state, loss = step(params, opt_state, batches[0])  # compile
    jax.block_until_ready(loss)
    count, started = 0, time.perf_counter()
    for batch in batches[1:]:
      params, opt_state, loss = step(params, opt_state, batch)
      count += int(np.sum(batch["label"] >= 0))
    jax.block_until_ready(loss)
    timings[name] = count / (time.perf_counter() - started)
    results[f"{name}_images_per_s"] = timings[name]
  results["packed_vs_padded_speedup"] = timings["packed"] / timings["padded"]
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  result = run(FLAGS.epochs, FLAGS.seq_len, FLAGS.images_per_pack, FLAGS.packs_per_batch,
               FLAGS.batch_size, FLAGS.timing_steps, FLAGS.seed)
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
