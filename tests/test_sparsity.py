"""N:M and global magnitude pruning as an optax wrapper, and through the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import train_in_process
from vit_jax import sparsity, workdir


def _nonzeros_per_group(kernel, m=4):
  kernel = np.asarray(kernel)
  groups = kernel.reshape((kernel.shape[0] // m, m) + kernel.shape[1:])
  return (groups != 0).sum(axis=1)


def _train(tx, params, steps=12):
  target = jax.tree.map(lambda p: 2 * p[::-1], params)  # distinct values: no ties
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.tree.map(lambda p, t: p - t, params, target)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_two_four_masks_and_global_magnitude():
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"a": {"kernel": jax.random.normal(keys[0], (8, 6))},
            "b": {"kernel": jax.random.normal(keys[1], (12, 2, 3)),
                  "bias": jax.random.normal(keys[2], (3,))}}
  tx = sparsity.prune(optax.sgd(0.1), params, n=2, m=4, update_every=5)
  trained, state = _train(tx, params)
  for name in "ab":
    assert (_nonzeros_per_group(trained[name]["kernel"]) == 2).all()
  assert (np.asarray(trained["b"]["bias"]) != 0).all()  # not targeted
  assert np.asarray(state.masks["b"]["bias"]).all()
  report = sparsity.report(trained)
  assert report["global"] == 0.5 and report["a/kernel"] == 0.5

  for fraction in (0.5, 0.8):
    tx = sparsity.prune(optax.sgd(0.1), params, sparsity=fraction, update_every=5)
    trained, _ = _train(tx, params)
    assert sparsity.report(trained)["global"] == pytest.approx(fraction, abs=0.01)

  with pytest.raises(ValueError, match="sparsity: m=4 does not divide"):
    sparsity.nm_mask(jnp.ones((6, 2)), 2, 4)
  with pytest.raises(ValueError, match="either n and m"):
    sparsity.prune(optax.sgd(0.1), params, n=2, m=4, sparsity=0.5)


def test_trainer_two_four_checkpoint(tfds_dir, tmp_path):
  train_in_process(tfds_dir, tmp_path, "vit_tiny_patch16_224", steps=10, image_size=16,
                   patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                   config_overrides={"sparsity": {"n": 2, "m": 4, "update_every": 4,
                                                  "targets": r"^Transformer/.*kernel$"}})
  variables, _ = workdir.read_variables(tmp_path)
  kernels = {k: v for k, v in sparsity.report(
      variables["params"], r"^Transformer/.*kernel$").items() if k != "global"}
  assert len(kernels) == 6  # q, k, v, out, two MLP
  for path, value in jax.tree_util.tree_leaves_with_path(variables["params"]):
    name = jax.tree_util.keystr(path)
    if name.startswith("['Transformer']") and name.endswith("['kernel']"):
      assert (_nonzeros_per_group(value) == 2).all(), name
