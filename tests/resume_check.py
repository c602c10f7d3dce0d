"""In-process resume exactness: a finished run's workdir, cut back to an earlier
checkpoint as a kill after that save would leave it, must train to the same state.

Cheaper than killing a ``python -m vit_jax.main`` subprocess (each pays ~18 s of
TensorFlow import); tests/kill_resume.py does the real ``kill -9`` for every trainer.
"""

import os
import shutil

import jax
import numpy as np

from vit_jax import checkpoint, tree


def cut_back(workdir, copy, step: int) -> str:
  """Copies ``workdir`` to ``copy`` without its checkpoints after ``step`` and without
  the final results: what a kill right after the save of ``step`` leaves."""
  shutil.copytree(workdir, copy)
  ckpt_dir = os.path.join(copy, "checkpoints")
  later = [e for e in os.listdir(ckpt_dir) if e.isdigit() and int(e) > step]
  assert later, f"{workdir} has no checkpoint after step {step}"
  for entry in later:
    shutil.rmtree(os.path.join(ckpt_dir, entry))
  os.remove(os.path.join(copy, "results.json"))
  assert sorted(int(e) for e in os.listdir(ckpt_dir) if e.isdigit())[-1] == step
  return str(copy)


def state_arrays(workdir, step: int) -> dict:
  """``{name: array}`` of the params and optimizer state saved at ``step``."""
  state = checkpoint.load_state_arrays(os.path.join(str(workdir), "checkpoints", str(step)))
  leaves = jax.tree_util.tree_flatten_with_path(
      {"params": state["params"], "opt_state": state["opt_state"]})[0]
  return {tree.path_name(path): np.asarray(leaf) for path, leaf in leaves}


def assert_same_state(workdir_a, workdir_b, step: int) -> int:
  """Params and optimizer state of ``step`` bit-identical in both; returns the count."""
  a, b = state_arrays(workdir_a, step), state_arrays(workdir_b, step)
  assert sorted(a) == sorted(b)
  differ = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not differ, f"{len(differ)} of {len(a)} arrays differ after the resume: {differ[:5]}"
  return len(a)
