"""The shared depthwise convolution: forward and gradients (input and weight) equal
``lax.conv_general_dilated`` with ``feature_group_count`` and its ``jax.grad`` on awkward
shapes; ``DepthwiseConv`` keeps ``nn.Conv``'s parameters; ``layers.Conv`` (1x1 as matrix
products) keeps ``nn.Conv``'s parameters, output and gradients; bad settings name themselves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vit_jax.models import layers
from vit_jax.models.depthwise import depthwise_conv

# (input spatial shape, kernel, strides, padding, dilation): odd and even sizes, stride 2
# with SAME (MaxViT, asymmetric pads) and explicit pads (EfficientViT-M, CvT), kernels
# 3/5/7 (7: ConvFormer), dilation, 1-D causal (Vim).
CASES = [
    ((7, 9), (3, 3), 1, ((1, 1), (1, 1)), 1),
    ((8, 6), (3, 3), 2, "SAME", 1),
    ((9, 7), (3, 3), 2, ((1, 1), (1, 1)), 1),
    ((11, 5), (5, 5), 1, "SAME", 1),
    ((13, 10), (7, 7), 1, ((3, 3), (3, 3)), 1),
    ((33, 30), (5, 5), 1, "SAME", 1),  # more than 28x28 outputs: the other reduction
    ((9, 9), (3, 5), (2, 1), "VALID", (2, 1)),
    ((10,), (4,), 1, ((3, 0),), 1),
]


def plain_conv(x, w, strides, padding, dilation):
  """The specification: XLA's grouped convolution with nn.Conv's kernel layout."""
  conv = nn.Conv(x.shape[-1], w.shape[:-2], strides=strides, padding=padding,
                 kernel_dilation=dilation, feature_group_count=x.shape[-1],
                 use_bias=False)
  return conv.apply({"params": {"kernel": w}}, x)


@pytest.mark.parametrize("spatial,kernel,strides,padding,dilation", CASES)
def test_shift_matches_grouped_conv_forward_and_gradients(spatial, kernel, strides,
                                                           padding, dilation):
  rng = np.random.default_rng(len(spatial) * 100 + sum(spatial) + sum(kernel))
  channels = 6
  x = jnp.asarray(rng.standard_normal((3, *spatial, channels), np.float32))
  w = jnp.asarray(rng.standard_normal((*kernel, 1, channels), np.float32))
  ours = lambda x, w: depthwise_conv(x, w, strides=strides, padding=padding,
                                     dilation=dilation, impl="shift")
  ref = lambda x, w: plain_conv(x, w, strides, padding, dilation)

  @jax.jit  # one compilation per case: both sides, forward and gradients
  def both(x, w, probe):
    # A loss that weights every output differently, so that any misplaced tap shows.
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w)) * probe))
    return [(f(x, w), jax.grad(loss(f), (0, 1))(x, w)) for f in (ours, ref)]

  out_shape = jax.eval_shape(ref, x, w).shape
  probe = jnp.asarray(rng.standard_normal(out_shape, np.float32))
  (y, grads), (y_ref, grads_ref) = both(x, w, probe)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  for name, g, g_ref in zip(("input", "weight"), grads, grads_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g / scale, g_ref / scale, atol=1e-5, rtol=0,
                               err_msg=f"{name} gradient")


def test_auto_and_xla_impls_agree():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 4), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 4), np.float32))
  outs = [depthwise_conv(x, w, strides=2, impl=impl) for impl in ("auto", "shift", "xla")]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=1e-5, rtol=1e-5)


def test_bfloat16_keeps_its_dtype():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 8), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 8), np.float32))
  exact = depthwise_conv(x, w, impl="xla")

  @jax.jit
  def shift_bf16(x, w):
    f = lambda x, w: depthwise_conv(x, w, impl="shift")
    return f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), (0, 1))(x, w)

  y, (gx, gw) = shift_bf16(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert y.dtype == gx.dtype == gw.dtype == jnp.bfloat16
  # bfloat16 inputs carry 8 mantissa bits: agreement at that precision.
  err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - exact)) / jnp.max(jnp.abs(exact)))
  assert err < 2e-2


def test_module_keeps_nn_conv_parameters_and_output():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7, 7, 5), np.float32))
  kw = dict(strides=(2, 2), padding="SAME", use_bias=True,
            bias_init=nn.initializers.normal(1.0))
  ours = layers.DepthwiseConv(5, (3, 3), **kw)
  plain = nn.Conv(5, (3, 3), feature_group_count=5, **kw)

  @jax.jit
  def init_and_apply(key, x):
    v_ours, v_plain = ours.init(key, x), plain.init(key, x)
    return v_ours, v_plain, ours.apply(v_ours, x), plain.apply(v_plain, x)

  v_ours, v_plain, y_ours, y_plain = init_and_apply(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_plain)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_plain)):
    np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
  np.testing.assert_allclose(y_ours, y_plain, atol=1e-5)


# layers.Conv: (kernel, strides, padding, groups); the 1x1 ones run as matrix products.
CONV_CASES = [((1, 1), 1, "SAME", 1), ((1, 1), 1, ((0, 0), (0, 0)), 4),
              ((1, 1), 2, "VALID", 1), ((3, 3), 1, "SAME", 2)]


@pytest.mark.parametrize("kernel,strides,padding,groups", CONV_CASES)
def test_conv_keeps_nn_conv_parameters_output_and_gradients(kernel, strides, padding,
                                                             groups):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 7, 8), np.float32))
  kw = dict(kernel_size=kernel, strides=strides, padding=padding,
            feature_group_count=groups, bias_init=nn.initializers.normal(1.0))
  ours, plain = layers.Conv(12, **kw), nn.Conv(12, **kw)

  @jax.jit
  def init_apply_grad(key, x):
    v = ours.init(key, x)
    loss = lambda m: (lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))))
    return (v, plain.init(key, x), ours.apply(v, x), plain.apply(v, x),
            jax.grad(loss(ours), (0, 1))(v, x), jax.grad(loss(plain), (0, 1))(v, x))

  v_ours, v_plain, y_ours, y_plain, g_ours, g_plain = init_apply_grad(
      jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_plain)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_plain)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(y_ours, y_plain, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_bad_settings_name_themselves():
  x = jnp.zeros((1, 5, 5, 4))
  with pytest.raises(ValueError, match="impl must be one of"):
    depthwise_conv(x, jnp.zeros((3, 3, 4)), impl="cudnn")
  with pytest.raises(ValueError, match=r"kernel \(3, 3, 3\) does not match"):
    depthwise_conv(x, jnp.zeros((3, 3, 3)))
  with pytest.raises(ValueError, match="strides=.*needs 2 entries"):
    depthwise_conv(x, jnp.zeros((3, 3, 4)), strides=(1, 1, 1))
  with pytest.raises(ValueError, match="features=8"):
    layers.DepthwiseConv(8, (3, 3)).init(jax.random.key(0), x)
