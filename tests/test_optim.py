"""Learning-rate schedules, weight-decay masks and optimizer construction."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import models, optim, tree


def test_warmup_then_cosine_and_linear():
  s = optim.learning_rate_schedule(1.0, 110, warmup_steps=10, decay="cosine", end_factor=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  s = optim.learning_rate_schedule(2.0, 100, decay="linear")
  np.testing.assert_allclose([s(0), s(50), s(100)], [2.0, 1.0, 0.0], atol=1e-6)
  assert float(optim.learning_rate_schedule(3.0, 10, decay="constant")(7)) == 3.0
  with pytest.raises(ValueError, match="unknown decay 'cos'"):
    optim.learning_rate_schedule(1.0, 10, decay="cos")
  with pytest.raises(ValueError, match="warmup_steps=10 must be below total_steps=10"):
    optim.learning_rate_schedule(1.0, 10, warmup_steps=10)


def test_no_weight_decay_on_norms_biases_and_embeddings():
  model = models.create("vit_tiny_patch16_224", image_size=32, patch_size=8,
                        hidden_size=32, num_layers=1, num_heads=2, mlp_dim=32,
                        classifier="map")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  mask = optim.weight_decay_mask(params["params"])
  flat = {tree.path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, m in flat.items() if m)
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in decayed
  assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in decayed
  assert "embedding/kernel" in decayed and "head/kernel" in decayed
  for name in ("Transformer/posembed_input/pos_embedding", "MAPHead_0/probe",
               "Transformer/encoder_norm/scale", "head/bias",
               "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/bias"):
    assert not flat[name], name
  assert all(k.endswith("kernel") for k in decayed)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizers_decay_only_masked_params(name):
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  config = ml_collections.ConfigDict(dict(name=name, weight_decay=0.5, grad_clip_norm=1.0,
                                          momentum=0.0))
  tx = optim.make_optimizer(config, optax.constant_schedule(0.1), params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert np.all(np.asarray(updates["kernel"]) < 0)  # decayed towards zero
  np.testing.assert_array_equal(updates["bias"], 0.0)  # biases are never decayed


def test_gradient_clipping_and_unknown_optimizer():
  params = {"w": jnp.zeros((3,))}
  config = ml_collections.ConfigDict(dict(name="sgd", grad_clip_norm=1.0, momentum=0.0))
  tx = optim.make_optimizer(config, optax.constant_schedule(1.0), params)
  updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
    optim.make_optimizer(ml_collections.ConfigDict(dict(name="adam")),
                         optax.constant_schedule(1.0), params)
