"""Outlier-robust attention and I-ViT's integer ops (vit_jax/models/robust_ops.py).

The error bounds are the ones measured here on normal inputs (I-ViT states none); the
module docstring quotes them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import robust_ops

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2,
            mlp_dim=64, num_classes=0)


def _normal(shape, std, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * std, jnp.float32)


def test_clipped_softmax_is_the_papers_formula():
  x = _normal((4, 17), 3.0)
  p = np.asarray(jax.nn.softmax(x))
  got = robust_ops.clipped_softmax(x, zeta=1.1, gamma=-0.05)
  np.testing.assert_allclose(got, np.clip(1.15 * p - 0.05, 0, 1), atol=1e-6)
  assert (np.asarray(got) == 0).any()  # exact zeros at finite logits
  np.testing.assert_allclose(robust_ops.clipped_softmax(x, zeta=1.0, gamma=0.0), p,
                             atol=1e-7)
  # The clip stops the gradient of clipped weights.
  grad = jax.grad(lambda x: robust_ops.clipped_softmax(x, gamma=-0.05)[0].sum())(x)
  assert np.isfinite(grad).all()


def test_shiftmax_within_measured_error_of_softmax():
  tokens = 197  # ViT-B/16's sequence
  x = _normal((32, tokens), 3.0)
  shiftmax = jax.jit(robust_ops.shiftmax)
  got = np.asarray(shiftmax(x))
  assert np.abs(got - jax.nn.softmax(x)).max() < 0.025
  # Integer outputs: multiples of 2**-7 (out_bits=8), rows sum to at most 1.
  np.testing.assert_array_equal(got * 128, np.round(got * 128))
  assert (got.sum(-1) <= 1 + 1e-6).all()
  # Masked logits (the float32 minimum, as the attention writes them) weigh 0.
  masked = x.at[:, :3].set(jnp.finfo(jnp.float32).min)
  out = np.asarray(shiftmax(masked))
  assert (out[:, :3] == 0).all()
  assert np.abs(out[:, 3:] - jax.nn.softmax(x[:, 3:])).max() < 0.025
  # Straight-through: softmax's gradient.
  f = lambda fn: jax.jit(jax.grad(lambda x: (fn(x) * jnp.arange(tokens)).sum()))(x)
  np.testing.assert_allclose(f(robust_ops.shiftmax), f(jax.nn.softmax), atol=1e-6)


def test_shift_gelu_within_measured_error_of_gelu():
  x = _normal((16, 768), 2.0)
  exact = nn.gelu(x, approximate=False)
  shift_gelu = jax.jit(robust_ops.shift_gelu)
  error = np.abs(np.asarray(shift_gelu(x)) - exact)
  # x * sigmoid(1.702 x) alone is 0.021 off; the 8-bit sigmoid adds |x| / 128.
  assert (error < 0.03 + np.abs(x) / 128).all(), error.max()
  assert np.abs(x * jax.nn.sigmoid(1.702 * x) - exact).max() > 0.02  # the bound is not loose
  # A row with an outlier keeps its small values' GELU (the row-max form loses them).
  row = x[:1].at[0, 0].set(40.0)
  error = np.abs(np.asarray(shift_gelu(row))[0, 1:] - exact[0, 1:])
  assert (error < 0.03 + np.abs(x[0, 1:]) / 128).all(), error.max()


def test_integer_layer_norm_and_sqrt():
  n = np.concatenate([np.arange(0, 70_000), [2**30, 2**31 - 1, 123_456_789]]).astype(np.int32)
  np.testing.assert_array_equal(jax.jit(robust_ops.integer_sqrt)(jnp.asarray(n)),
                                np.floor(np.sqrt(n.astype(np.float64))).astype(np.int32))
  x = _normal((32, 384), 1.5) + 0.7
  norm = robust_ops.ILayerNorm()
  variables = norm.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {"params": {"scale": (384,), "bias": (384,)}}
  variables = jax.tree.map(lambda v: v + _normal(v.shape, 0.1, seed=1), variables)
  got = jax.jit(norm.apply)(variables, x)
  ref = nn.LayerNorm(epsilon=1e-6).apply(variables, x)
  assert np.abs(got - ref).max() < 0.05


def _features(variables=None, **settings):
  model = models.create("vit_tiny_patch16_224", **TINY, **settings)
  x = _normal((2, 16, 16, 3), 1.0, seed=2)
  variables = variables or jax.jit(model.init)(jax.random.key(0), x)
  return variables, jax.jit(model.apply)(variables, x)


def test_settings_keep_the_parameters_and_change_the_ops():
  plain_vars, plain = _features()
  for settings in (dict(attention_softmax="clipped"),
                   dict(attention_softmax="shiftmax", mlp_activation="shiftgelu",
                        norm_type="ilayernorm")):
    # Same parameter tree: a float checkpoint loads into the robust model.
    _, out = _features(plain_vars, **settings)
    assert 1e-4 < np.abs(out - plain).max() < 1.0, settings
  # The gate adds MultiHeadDotProductAttention_1/gate ([dim, heads]); open (sigmoid = 1)
  # it is the plain model.
  gated_vars = jax.eval_shape(
      models.create("vit_tiny_patch16_224", **TINY, attention_gate=True).init,
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  attention = gated_vars["params"]["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_1"]
  assert attention["gate"]["kernel"].shape == (32, 2)
  params = jax.tree.map(lambda v: v, plain_vars["params"])
  for i in range(2):
    params["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["gate"] = {
        "kernel": jnp.zeros((32, 2)), "bias": jnp.full((2,), 30.0)}
  _, opened = _features({"params": params}, attention_gate=True)
  np.testing.assert_allclose(opened, plain, atol=1e-5)


@pytest.mark.parametrize("settings,message", [
    (dict(attention_softmax="soft"), "attention_softmax must be one of"),
    (dict(attention_softmax="clipped", softmax_gamma=0.1), "softmax_gamma <= 0"),
    (dict(attention_softmax="clipped", softmax_zeta=0.9), "softmax_zeta >= 1"),
    (dict(attention_softmax="shiftmax", attention_impl="pallas"), "attention_impl='xla'"),
    (dict(attention_softmax="clipped", attention_dropout_rate=0.1), "attention_dropout_rate=0"),
    (dict(mlp_activation="relu"), "mlp_activation must be one of"),
    (dict(norm_type="rmsnorm"), "norm_type must be one of"),
])
def test_bad_settings_name_the_setting(settings, message):
  with pytest.raises(ValueError, match=message):
    _features(**settings)
