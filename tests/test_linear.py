"""The shared dense layers equal Flax's, and on CPU their products are 2-D."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import layers, linear


def _apply_and_grads(module, params, x):
  loss = lambda p, x: jnp.sum(jnp.cos(module.apply(p, x).astype(jnp.float32)))
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


def _dot_operand_ranks(module, params, x):
  """(lhs rank, rhs rank) of every dot_general in the forward + backward program."""
  loss = lambda p, x: jnp.sum(jnp.cos(module.apply(p, x)))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x)
  ranks = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        ranks.append(tuple(v.aval.ndim for v in eqn.invars))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  return ranks


CASES = [  # (ours, Flax's, input shape)
    (layers.Dense(13), nn.Dense(13), (3, 7, 5, 24)),
    (layers.Dense(9, use_bias=False), nn.Dense(9, use_bias=False), (2, 197, 48)),
    (layers.Dense(6), nn.Dense(6), (5, 11)),
    (layers.DenseGeneral((4, 6)), nn.DenseGeneral((4, 6)), (2, 9, 16)),
    (layers.DenseGeneral(10, axis=(-2, -1)), nn.DenseGeneral(10, axis=(-2, -1)),
     (2, 9, 4, 6)),
    # Batch axes and bfloat16 run the same products (the first one unflattened).
    (layers.DenseGeneral(5, axis=-1, batch_dims=(0,)),
     nn.DenseGeneral(5, axis=-1, batch_dims=(0,)), (3, 7, 8)),
    (layers.Dense(12, dtype=jnp.bfloat16), nn.Dense(12, dtype=jnp.bfloat16), (2, 5, 16)),
]


@pytest.mark.parametrize("ours,flax_dense,shape", CASES)
def test_dense_forward_and_gradients_equal_flax(ours, flax_dense, shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  params = flax_dense.init(jax.random.PRNGKey(1), x)
  ours_params = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
  for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  (y, grads), (y_ref, grads_ref) = (_apply_and_grads(ours, params, x),
                                    _apply_and_grads(flax_dense, params, x))
  assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
  tol = 1e-2 if y.dtype == jnp.bfloat16 else 1e-5
  for a, b in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_ref, grads_ref))):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_on_cpu_every_product_is_two_dimensional_and_elsewhere_none_is(monkeypatch):
  module, shape = layers.DenseGeneral(10, axis=(-2, -1)), (2, 9, 4, 6)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  params = module.init(jax.random.PRNGKey(1), x)
  assert jax.default_backend() == "cpu"
  ranks = _dot_operand_ranks(module, params, x)
  assert len(ranks) == 3 and set(ranks) == {(2, 2)}, ranks  # forward, both gradients
  # Other backends keep Flax's product (a relayout on TPU; not measured there).
  monkeypatch.setattr(linear.jax, "default_backend", lambda: "gpu")
  assert (4, 3) in _dot_operand_ranks(module, params, x)


def test_pointwise_conv_product_is_two_dimensional_on_cpu():
  conv = layers.Conv(12, (1, 1))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 8))
  params = conv.init(jax.random.PRNGKey(1), x)
  assert set(_dot_operand_ranks(conv, params, x)) == {(2, 2)}


def test_a_patched_dot_general_sees_the_product_the_layer_wrote(monkeypatch):
  # qwix's quantization patches lax.dot_general; its scales have the layer's shapes.
  seen, original = [], jax.lax.dot_general

  def spy(lhs, rhs, *args, **kwargs):
    seen.append((lhs.shape, rhs.shape))
    return original(lhs, rhs, *args, **kwargs)

  monkeypatch.setattr(jax.lax, "dot_general", spy)
  layers.Dense(5).init_with_output(jax.random.PRNGKey(0), jnp.ones((2, 7, 3)))
  assert seen == [((2, 7, 3), (3, 5))]
