r"""Peak memory of the image-text training stream over large shards: window parts
(``input.window_bytes``) against whole-shard windows.

  PYTHONPATH=$PWD python tests/stream_memory.py --shards=4 --shard_mb=96 --window_mb=32

Writes ``--shards`` shards of ``--shard_mb`` MB each (200 kB samples of random bytes:
the stream reads and checks, it does not decode), then in a fresh process per setting
reads 1.5 epochs through ``ImageTextStream(shards_per_window=--shards)`` and prints
the process's peak resident memory (and its peak before reading: the imports), the
stream's ``max_held_bytes`` and that every sample came once in epoch 0. Too slow for
the test suite; tests/test_image_text.py checks the bound on small shards.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SAMPLE_BYTES = 200_000

CHILD = r"""
import collections, json, resource, sys
from vit_jax.data import image_text
paths, window_bytes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
stream = image_text.ImageTextStream(paths, seed=0, shards_per_window=len(paths),
                                    window_bytes=window_bytes)
counts, total = collections.Counter(), int(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports
for n, (sample, position) in zip(range(total + total // 2), stream):
  if position.epoch == 0:
    counts[sample["key"]] += 1
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mb": before,
                  "max_held_mb": stream.max_held_bytes / 2**20,
                  "epoch0_each_once": len(counts) == total and set(counts.values()) == {1}}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--shard_mb", type=int, default=96)
  parser.add_argument("--window_mb", type=int, default=32)
  args = parser.parse_args()
  from vit_jax.data import image_text  # pylint: disable=g-import-not-at-top
  per_shard = args.shard_mb * 10**6 // SAMPLE_BYTES
  with tempfile.TemporaryDirectory() as tmp:
    paths = []
    for s in range(args.shards):
      path = os.path.join(tmp, f"big-{s:03d}.tar")
      with image_text.ShardWriter(path, per_shard) as writer:
        for i in range(per_shard):
          writer.write(f"s{s:03d}_{i:05d}", {"jpg": os.urandom(SAMPLE_BYTES),
                                             "txt": f"caption {s} {i}"})
      paths.append(path)
    total = per_shard * args.shards
    print(f"{args.shards} shards of {per_shard} samples ({args.shard_mb} MB each), "
          f"one window of {args.shards} shards, 1.5 epochs")
    for window_bytes in (args.window_mb << 20, None):
      result = subprocess.run(
          [sys.executable, "-c", CHILD, json.dumps(paths), json.dumps(window_bytes),
           str(total)], capture_output=True, text=True, check=True,
          env={**os.environ, "PYTHONPATH": REPO})
      stats = json.loads(result.stdout.strip().splitlines()[-1])
      name = f"window_bytes={args.window_mb} MiB" if window_bytes else "whole shards"
      print(f"{name}: peak RSS {stats['peak_rss_mb']:.0f} MiB ("
            f"{stats['before_mb']:.0f} MiB before reading), max held "
            f"{stats['max_held_mb']:.0f} MiB, epoch 0 every sample once: "
            f"{stats['epoch0_each_once']}")


if __name__ == "__main__":
  main()
