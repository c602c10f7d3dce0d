r"""Samples/s of an input pipeline, per process, at 1..K CPU threads, and its stages.

  python -m vit_jax.tools.data_benchmark --config=configs/clip_datacomp.py \
      --config.input.train_shards=pool256/train \
      --config.tokenizer.path=pool256/tokenizer.json --threads=1,2 --seconds=20
  python -m vit_jax.tools.data_benchmark --shards='pool/*.tar' \
      --tokenizer=pool/tokenizer.json --pp='decode|random_resized_crop(224)|flip_lr'
  python -m vit_jax.tools.data_benchmark --dataset=digit_scenes \
      --pp='decode|random_resized_crop(224)|flip_lr|value_range(-1, 1)'

The pipeline is a config's input section (``--config``: image-text shards for the
contrastive trainer, a TFDS dataset for classification) or given by flags
(``--shards`` and ``--tokenizer``, or ``--dataset``; ``--pp`` overrides the config's
``pp_train``, ``--batch_size`` is per process). Every measurement runs in a fresh
worker process pinned to ``threads`` CPUs (``os.sched_setaffinity``) with ``threads``
tf.data threads: it builds the training pipeline the trainer builds, drops
``--warmup`` seconds, then counts the samples of the batches it receives in
``--seconds`` seconds, and the CPU time they took. Measurements are interleaved
(``--repeats`` rounds over the thread counts, each this tree then the baseline), so a
shared machine's load hits them alike; the table gives medians and the 1-minute load
average seen by each run.

``--baseline=DIR`` measures the pipeline of another checkout of vit_jax (e.g.
``git worktree add ../main main``) in the same rounds, with that tree first on the
worker's path.

``--independent`` also runs, for each K > 1 of ``--threads``, K one-thread workers at
once, each pinned to its own CPU: their summed samples/s is what the machine gives this
pipeline with no thread waiting on another process's, so K threads in one process that
scale less than K independent processes lose the difference inside the process. Every
run also counts the worker's threads that did at least a tenth of its CPU work (more
than the pinned CPUs: they queue) and its context switches per sample.

``--stages`` (default on) then measures, on one thread, the CPU time per sample of
each stage alone on cached inputs: read (the shard reader, or records read by index),
decode, augment (the pp string on decoded images), tokenize (image-text) and batch
(stacking a batch and handing it to numpy). They add up to about the pipeline's
1-thread CPU time per sample; the largest is what to make cheaper.
"""

import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "A training config whose input section is measured.",
      lock_config=False)
  flags.DEFINE_string("shards", None, "Image-text shards (glob, brace range, directory "
                      "or comma list).")
  flags.DEFINE_string("tokenizer", None, "The tokenizer.json for --shards.")
  flags.DEFINE_integer("context_length", 77, "Tokens per caption (--shards).")
  flags.DEFINE_string("dataset", None, "A TFDS dataset (classification input).")
  flags.DEFINE_string("data_dir", None, "The TFDS data directory for --dataset.")
  flags.DEFINE_string("split", "train", "The split of --dataset.")
  flags.DEFINE_string("pp", None, "Preprocessing (default: the config's pp_train).")
  flags.DEFINE_integer("batch_size", 256, "Per-process batch.")
  flags.DEFINE_list("threads", None, "CPU counts to measure (default: 1 up to the CPUs "
                    "this process may use).")
  flags.DEFINE_float("seconds", 20.0, "Measured seconds per run.")
  flags.DEFINE_float("warmup", 5.0, "Seconds dropped before measuring.")
  flags.DEFINE_integer("repeats", 2, "Interleaved rounds.")
  flags.DEFINE_string("baseline", None, "Another vit_jax checkout, measured in the same "
                      "rounds.")
  flags.DEFINE_bool("stages", True, "Also measure each stage alone.")
  flags.DEFINE_bool("independent", False, "Also run K one-thread processes at once, "
                    "pinned apart, for each K > 1 of --threads: the machine's own scaling "
                    "for this pipeline.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here: --help answers without starting TensorFlow.
  from vit_jax.data import benchmark  # pylint: disable=g-import-not-at-top
  usable = len(os.sched_getaffinity(0))
  threads = ([int(t) for t in FLAGS.threads] if FLAGS.threads
             else list(range(1, usable + 1)))
  if max(threads) > usable or min(threads) < 1:
    raise app.UsageError(f"--threads={','.join(map(str, threads))}: use 1 to {usable} "
                         "(the CPUs this process may use)")
  try:
    spec = benchmark.pipeline_spec(
        FLAGS.config, shards=FLAGS.shards, tokenizer=FLAGS.tokenizer,
        context_length=FLAGS.context_length, dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir, split=FLAGS.split, pp=FLAGS.pp,
        batch_size=FLAGS.batch_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  results = benchmark.measure(spec, threads=threads, seconds=FLAGS.seconds,
                              warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                              baseline=FLAGS.baseline, stages=FLAGS.stages,
                              independent=FLAGS.independent)
  print(benchmark.report(results, threads))


if __name__ == "__main__":
  define_flags()
  app.run(main)
