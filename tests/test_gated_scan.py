"""The gated-scan kernel family: reference == naive recurrence, XLA custom VJP and
Pallas (TPU configuration, interpret mode) == reference, lowering for TPU.

Tolerances as in ``test_kernels.py``: float32 within 1e-5 of the largest reference
value (when that exceeds 1), bfloat16 within 2e-2 of it against the float32 reference
on the same bf16-rounded inputs. Token counts 196, 197 and 1,000 (no chunk divides
them), both directions, batch 1, per-key-dimension and per-head decays. Interpret
mode compiles slowly, so its cases use small head dims and one jit per case.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import kernels
from vit_jax.kernels.gated_scan import chunked, pallas
from vit_jax.kernels.gated_scan import reference as ref


def _inputs(seed, tokens, heads, dk, dv, decay, strength=1.0):
  rng = np.random.RandomState(seed)
  q, k = rng.randn(2, 1, tokens, heads, dk).astype(np.float32)
  v = rng.randn(1, tokens, heads, dv).astype(np.float32)
  # GLA's gate: log-sigmoid of a projection, here of a random normal.
  logits = 2 * rng.randn(1, tokens, heads, dk if decay == "key" else 1) - 1
  g = strength * -np.logaddexp(0.0, -logits).astype(np.float32)
  return [jnp.asarray(x) for x in (q, k, v, g)]


def _both_directions(fn, args, cotangent):
  """Outputs and the VJP of every input, forward and reverse, in one jit."""
  def run(*args):
    results = []
    for reverse in (False, True):
      out, vjp = jax.vjp(functools.partial(fn, reverse=reverse), *args)
      results.append((out, vjp(cotangent.astype(out.dtype))))
    return results
  return jax.jit(run)(*args)


def assert_matches(fn, args, dtype=jnp.float32, reference=ref.gated_scan_reference):
  args = [a.astype(dtype) if i < 3 else a for i, a in enumerate(args)]
  rng = np.random.RandomState(99)
  cotangent = jnp.asarray(rng.randn(*args[2].shape).astype(np.float32))
  got = _both_directions(fn, args, cotangent)
  want = _both_directions(reference, [a.astype(jnp.float32) for a in args], cotangent)
  names = ("output", "dq", "dk", "dv", "dg")
  for direction, g_result, w_result in zip(("forward", "reverse"), got, want):
    for name, g, w in zip(names, jax.tree.leaves(g_result), jax.tree.leaves(w_result)):
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      assert g.shape == w.shape, (direction, name)
      scale = float(np.abs(w).max())
      err = float(np.abs(g - w).max())
      bound = 1e-5 * max(1.0, scale) if dtype == jnp.float32 else 2e-2 * scale
      assert scale > 0 and err <= bound, (
          f"{direction} {name}: max |diff| {err:.3g} (scale {scale:.3g})")


@pytest.mark.parametrize("tokens,decay", [(197, "key"), (1000, "head")])
def test_reference_is_the_recurrence(tokens, decay):
  q, k, v, g = _inputs(0, tokens, 2, 8, 4, decay)
  for reverse in (False, True):
    naive = ref.gated_scan_naive(q, k, v, g, reverse=reverse)
    chunked_form = ref.gated_scan_reference(q, k, v, g, reverse=reverse)
    scale = float(jnp.abs(naive).max())
    assert scale > 1
    np.testing.assert_allclose(chunked_form, naive, atol=1e-5 * scale)


def test_naive_recurrence_by_hand():
  """Two tokens, one head, dk = dv = 1: o_0 = q0 k0 v0, o_1 = q1 (e^g1 k0 v0 + k1 v1)."""
  q, k, v = (jnp.asarray([[[[a]], [[b]]]], jnp.float32) for a, b in
             ((2.0, 3.0), (5.0, 7.0), (11.0, 13.0)))
  g = jnp.log(jnp.asarray([[[[0.5]], [[0.25]]]], jnp.float32))
  forward = ref.gated_scan_naive(q, k, v, g)[0, :, 0, 0]
  np.testing.assert_allclose(forward, [2 * 5 * 11, 3 * (0.25 * 5 * 11 + 7 * 13)], rtol=1e-6)
  # Reverse: o_1 = q1 k1 v1, o_0 = q0 (e^g0 k1 v1 + k0 v0).
  backward = ref.gated_scan_naive(q, k, v, g, reverse=True)[0, :, 0, 0]
  np.testing.assert_allclose(backward, [2 * (0.5 * 7 * 13 + 5 * 11), 3 * 7 * 13], rtol=1e-6)
  np.testing.assert_allclose(ref.gated_scan_reference(q, k, v, g, reverse=True)[0, :, 0, 0],
                             backward, rtol=1e-6)


def test_strong_decays_do_not_overflow():
  """Chunks that decay by thousands of nats: exp(G_i) exp(-G_j) would be inf * 0."""
  q, k, v, g = _inputs(1, 197, 1, 4, 3, "key", strength=40.0)
  assert float(jnp.sum(g[0, :64, 0], axis=0).min()) < -1000
  naive = ref.gated_scan_naive(q, k, v, g)
  for out in (ref.gated_scan_reference(q, k, v, g), chunked.gated_scan(q, k, v, g)):
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, naive, atol=1e-5 * float(jnp.abs(naive).max()))


XLA_CASES = [
    # (tokens, heads, dk, dv, decay, dtype)
    (196, 2, 8, 16, "head", jnp.float32),
    (1000, 1, 16, 1, "key", jnp.float32),  # Vim's shape: a channel per head, dv = 1
    (197, 2, 8, 16, "key", jnp.bfloat16),
]


@pytest.mark.parametrize("case", XLA_CASES, ids=lambda c: "-".join(
    str(getattr(x, "__name__", x)) for x in c))
def test_xla_custom_vjp_matches_reference(case):
  tokens, heads, dk, dv, decay, dtype = case
  assert_matches(chunked.gated_scan, _inputs(2, tokens, heads, dk, dv, decay), dtype)


PALLAS_CASES = [
    # (tokens, heads, dk, dv, decay, dtype, chunk)
    (197, 1, 4, 8, "key", jnp.float32, 32),
    (1000, 1, 8, 8, "head", jnp.float32, None),
    (196, 1, 4, 8, "key", jnp.bfloat16, None),
]


@pytest.mark.parametrize("case", PALLAS_CASES, ids=lambda c: "-".join(
    str(getattr(x, "__name__", x)) for x in c))
def test_pallas_matches_reference(case):
  tokens, heads, dk, dv, decay, dtype, chunk = case
  fn = functools.partial(pallas.gated_scan, chunk=chunk)
  assert_matches(fn, _inputs(3, tokens, heads, dk, dv, decay), dtype)


@pytest.mark.parametrize("dk,dv,decay", [(32, 64, "key"), (32, 64, "head"), (16, 1, "key")])
def test_pallas_lowers_for_tpu(dk, dv, decay):
  """ViG/ViR and Vim head shapes lower to Mosaic, forward and backward."""
  q = jnp.zeros((2, 197, 3, dk), jnp.bfloat16)
  v = jnp.zeros((2, 197, 3, dv), jnp.bfloat16)
  g = jnp.zeros((2, 197, 3, dk if decay == "key" else 1), jnp.float32)
  fn = functools.partial(pallas.gated_scan, interpret=False)
  grad = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
  for f in (fn, grad):
    jax.jit(f).trace(q, q, v, g).lower(lowering_platforms=("tpu",))


def test_dispatch_and_errors():
  q, k, v, g = _inputs(4, 20, 1, 4, 2, "head")
  np.testing.assert_array_equal(kernels.gated_scan(q, k, v, g, impl="auto"),
                                kernels.gated_scan(q, k, v, g, impl="xla"))
  with pytest.raises(ValueError, match="unknown attention implementation 'triton'"):
    kernels.gated_scan(q, k, v, g, impl="triton")
  with pytest.raises(ValueError, match=r"log decay g must be \[batch, tokens, heads, dk\]"):
    kernels.gated_scan(q, k, v, g[..., :1].repeat(3, axis=-1))
  with pytest.raises(ValueError, match="v .* must agree with q"):
    kernels.gated_scan(q, k, v[:, :5], g)
  with pytest.raises(ValueError, match="multiple of 8 tokens, got 12"):
    pallas.gated_scan(q, k, v, g, chunk=12)
