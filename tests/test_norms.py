"""The shared norms with a hand-written backward equal Flax's autodiff; the erf GELU
equals JAX's erfc one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import layers


def _apply_and_grads(module, params, x):
  loss = lambda p, x: jnp.sum(jnp.cos(module.apply(p, x).astype(jnp.float32)) * x)
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


def _close(a, b, rtol):
  """Within ``rtol`` of the larger array's largest magnitude (sums over many elements
  make absolute bounds meaningless)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
  np.testing.assert_array_less(np.abs(a - b).max() / scale, rtol)


@pytest.mark.parametrize("ours,flax_norm,shape", [
    (layers.LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6, use_fast_variance=False),
     (3, 7, 5, 24)),
    (layers.LayerNorm(use_bias=False), nn.LayerNorm(use_bias=False), (2, 197, 48)),
    (layers.LayerNorm(use_scale=False), nn.LayerNorm(use_scale=False), (5, 13)),
    (layers.GroupNorm(num_groups=1, epsilon=1e-6, use_bias=False),
     nn.GroupNorm(num_groups=1, epsilon=1e-6, use_bias=False, use_fast_variance=False),
     (2, 9, 11, 16)),
    (layers.GroupNorm(num_groups=1), nn.GroupNorm(num_groups=1), (3, 49, 32)),
    (layers.GroupNorm(num_groups=None, group_size=16), nn.GroupNorm(
        num_groups=None, group_size=16), (2, 5, 5, 16)),
    # Fallbacks to Flax: several groups, another dtype, another axis.
    (layers.GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4), (2, 6, 6, 16)),
    (layers.LayerNorm(dtype=jnp.bfloat16), nn.LayerNorm(dtype=jnp.bfloat16), (2, 10, 32)),
    (layers.LayerNorm(reduction_axes=(1, 2), feature_axes=(-1,)),
     nn.LayerNorm(reduction_axes=(1, 2), feature_axes=(-1,)), (2, 4, 6, 8)),
])
def test_norm_forward_and_gradients_equal_flax(ours, flax_norm, shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 2  # a large mean
  params = flax_norm.init(jax.random.PRNGKey(1), x)
  ours_params = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(ours_params) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
  params = jax.tree.map(  # not the init's ones and zeros
      lambda v: v + jax.random.normal(jax.random.PRNGKey(2), v.shape), params)
  y, grads = _apply_and_grads(ours, params, x)
  y_flax, grads_flax = _apply_and_grads(flax_norm, params, x)
  bf16 = y.dtype == jnp.bfloat16
  _close(y, y_flax, 1e-2 if bf16 else 1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_flax)):
    _close(a, b, 2e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("module,fast", [
    (layers.LayerNorm(), True), (layers.LayerNorm(use_fast_variance=False), True),
    (layers.GroupNorm(num_groups=1), True), (layers.GroupNorm(num_groups=2), False),
    (layers.LayerNorm(dtype=jnp.bfloat16), False)])
def test_fast_path_is_taken_where_it_applies(module, fast):
  """Equal numbers alone would not notice a norm that always fell back to Flax."""
  x = jnp.ones((2, 4, 4, 8))
  params = module.init(jax.random.PRNGKey(0), x)
  program = str(jax.make_jaxpr(module.apply)(params, x))
  assert ("custom_vjp_call" in program) == fast


@pytest.mark.parametrize("module", [layers.LayerNorm(), layers.GroupNorm(num_groups=1)])
def test_backward_takes_its_channel_means_as_products_with_scale(module):
  """The speed of the backward on CPU rests on it (XLA:CPU otherwise writes scale and
  rstd out at full size); equal numbers alone would not notice the path gone."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  params = module.init(jax.random.PRNGKey(1), x)
  program = str(jax.make_jaxpr(lambda p, x: _apply_and_grads(module, p, x))(params, x))
  # The forward has no product; the backward two: mean(g * scale), mean(g * scale * x_hat).
  assert program.count("dot_general") == 2, program


def test_norm_under_jit_has_no_nan_on_a_constant_map():
  x = jnp.full((2, 4, 4, 8), 3.0)
  module = layers.GroupNorm(num_groups=1)
  params = module.init(jax.random.PRNGKey(0), x)
  y, grads = jax.jit(lambda p, x: _apply_and_grads(module, p, x))(params, x)
  assert np.isfinite(np.asarray(y)).all()
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_equals_jax_exact_gelu(dtype, tol):
  x = (jnp.linspace(-12, 12, 4001) ** 3 / 100).astype(dtype)  # tails and the middle
  ref = lambda x: jax.nn.gelu(x, approximate=False)
  _close(layers.gelu(x), ref(x), tol)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x)
  _close(grad(layers.gelu), grad(ref), tol)
  np.testing.assert_array_equal(layers.gelu(x, approximate=True),
                                jax.nn.gelu(x, approximate=True))


def test_gelu_derivative_is_written_out_and_differentiates_again():
  x = (jnp.linspace(-12, 12, 4001) ** 3 / 100).astype(jnp.float32)
  # The linear part is one product with the derivative the forward computed.
  _, tangent_fn = jax.linearize(layers.exact_gelu, x)
  eqns = jax.make_jaxpr(tangent_fn)(x).eqns
  assert [e.primitive.name for e in eqns] == ["mul"], eqns
  second = lambda f: jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(f(u)))(v)))(x)
  _close(second(layers.exact_gelu), second(lambda v: jax.nn.gelu(v, approximate=False)), 1e-5)


def test_gelu_is_kept_out_of_the_next_products_fusion_on_cpu_only(monkeypatch):
  x = jnp.ones((2, 5, 8))
  # A new function each time: make_jaxpr caches traces by function.
  primitives = lambda: {e.primitive.name
                        for e in jax.make_jaxpr(lambda v: layers.gelu(v))(x).eqns}
  assert jax.default_backend() == "cpu" and "optimization_barrier" in primitives()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "optimization_barrier" not in primitives()


def test_layers_ab_swaps_back_what_was_replaced_and_restores_it():
  from vit_jax.models import depthwise, linear
  from vit_jax.tools import layers_ab
  current = lambda: (layers.LayerNorm, layers.GroupNorm, layers.gelu, layers.Dense,
                     layers.DenseGeneral, linear.dot_general, layers.outside_product_fusion,
                     layers.exact_gelu,
                     depthwise._shift_conv)  # pylint: disable=protected-access
  ours = current()

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = layers.GroupNorm(num_groups=1)(layers.LayerNorm()(x))
      x = layers.gelu(layers.DepthwiseConv(x.shape[-1], (3, 3))(x))
      return layers.Conv(4, (1, 1))(layers.Dense(6)(x))

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 8))
  params = Block().init(jax.random.PRNGKey(1), x)
  y = Block().apply(params, x)
  with layers_ab.swapped(layers_ab.SWAPS):
    assert layers.LayerNorm is nn.LayerNorm and layers.GroupNorm is nn.GroupNorm
    assert layers.Dense is nn.Dense and layers.DenseGeneral is nn.DenseGeneral
    assert all(a is not b for a, b in zip(current(), ours))
    y_before = Block().apply(params, x)
  assert current() == ours
  _close(y, y_before, 1e-5)
  with pytest.raises(ValueError, match="unknown \\['gelus'\\]"):
    with layers_ab.swapped(["gelus"]):
      pass
