"""The windowed-attention reference against a direct per-window computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import kernels
from vit_jax.kernels.window_attention import reference
from vit_jax.models import layers


def windows_by_hand(x, window, mode):
  b, h, w = x.shape[:3]
  ph, pw = window
  out = []
  for i in range(h // ph):
    for j in range(w // pw):
      if mode == "block":
        rows, cols = np.arange(i * ph, i * ph + ph), np.arange(j * pw, j * pw + pw)
      else:
        rows, cols = np.arange(i, h, h // ph), np.arange(j, w, w // pw)
      out.append(x[:, rows][:, :, cols].reshape((b, ph * pw) + x.shape[3:]))
  return jnp.stack(out, axis=1)


@pytest.mark.parametrize("mode", ["block", "grid"])
def test_partition_round_trip_and_layout(mode):
  x = jnp.arange(2 * 6 * 8 * 3, dtype=jnp.float32).reshape(2, 6, 8, 3)
  parts = reference.partition(x, (3, 2), mode)
  np.testing.assert_array_equal(parts, windows_by_hand(x, (3, 2), mode))
  np.testing.assert_array_equal(reference.unpartition(parts, (3, 2), (6, 8), mode), x)


@pytest.mark.parametrize("mode", ["block", "grid"])
def test_attention_matches_per_window_softmax(mode):
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (2, 4, 6, 3, 8)
  q, k, v = (jax.random.normal(keys[i], shape) for i in range(3))
  window = (2, 3)
  num_windows, p = (4 // 2) * (6 // 3), 6
  bias = jax.random.normal(keys[3], (3, p, p))
  mask = jnp.where(jax.random.bernoulli(keys[4], 0.3, (num_windows, p, p)), -100.0, 0.0)
  out = kernels.window_attention(q, k, v, window=window, mode=mode, bias=bias, mask=mask)
  assert out.shape == shape
  qw, kw, vw = (windows_by_hand(t, window, mode) for t in (q, k, v))
  for n in range(num_windows):
    expected = layers.dot_product_attention(qw[:, n], kw[:, n], vw[:, n],
                                            bias=bias[None] + mask[n][None, None])
    got = windows_by_hand(out, window, mode)[:, n]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_errors():
  x = jnp.zeros((1, 5, 4, 1, 2))
  with pytest.raises(ValueError, match="cannot be cut into 2x2 block windows"):
    kernels.window_attention(x, x, x, window=(2, 2))
  with pytest.raises(ValueError, match="unknown attention implementation 'cuda'"):
    kernels.window_attention(x, x, x, window=(1, 1), impl="cuda")
