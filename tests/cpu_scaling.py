"""Does this machine's CPU work scale from 1 to 2 CPUs? The same JPEG decode + resize
(TensorFlow ops, one thread each) in 1 process vs 2 processes pinned apart (README,
"Input pipeline speed"). Not a test: ``python tests/cpu_scaling.py [seconds]``."""

import multiprocessing as mp
import os
import sys
import time


def work(cpu: int, seconds: float, results) -> None:
  os.sched_setaffinity(0, {cpu})
  os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
  os.environ["TF_NUM_INTEROP_THREADS"] = "1"
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)
  jpeg = tf.io.encode_jpeg(pixels)
  decode_and_resize = lambda: tf.image.resize(tf.io.decode_jpeg(jpeg), (224, 224))
  for _ in range(20):  # warm-up
    decode_and_resize()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    decode_and_resize()
    count += 1
  results.put(count / (time.perf_counter() - start))


def images_per_s(cpus, seconds: float) -> float:
  results = mp.Queue()
  processes = [mp.Process(target=work, args=(cpu, seconds, results)) for cpu in cpus]
  for p in processes:
    p.start()
  for p in processes:
    p.join()
  return sum(results.get() for _ in processes)


if __name__ == "__main__":
  mp.set_start_method("spawn")
  seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
  for round_ in range(2):
    one, two = images_per_s([0], seconds), images_per_s([0, 1], seconds)
    print(f"round {round_}: 1 process {one:.0f}/s, 2 processes {two:.0f}/s, "
          f"2 vs 1: {two / one:.2f}x, load {os.getloadavg()[0]:.1f}", flush=True)
