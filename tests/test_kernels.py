"""Pallas kernels against their references (interpret mode on CPU), and their wiring.

Every kernel case checks the forward pass and the gradient of every differentiable
input against the pure-JAX reference: float32 within 1e-5 (relative to the largest
reference value when that exceeds 1, e.g. a bias gradient summed over windows),
bfloat16 within 2e-2 relative to the float32 reference on the same inputs. Shapes
are small but awkward: 197 tokens, 7x7 windows (49 positions), head dims 32/64/96,
token counts that no block divides, batch 1. The ``pallas_call`` cases name their
block configuration: "triton" (the explicit GPU fallback) or "tpu" (Mosaic). The
Mosaic GPU kernel runs in GPU interpret mode. The lowering tests lower each kernel,
without running it, for CUDA (Mosaic GPU MLIR; Triton IR for the fallback) and TPU
(Mosaic), which rejects block shapes, layouts and operations those backends cannot
take.
"""

import contextlib
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import kernels, models
from vit_jax.kernels import bench
from vit_jax.kernels import parity
from vit_jax.kernels.attention import pallas as attention_pallas
from vit_jax.kernels.linear_attention import mosaic_gpu as linear_mosaic_gpu
from vit_jax.kernels.linear_attention import pallas as linear_pallas
from vit_jax.kernels.linear_attention import reference as linear_reference
from vit_jax.kernels.window_attention import pallas as window_pallas
from vit_jax.kernels.window_attention import reference as window_reference
from vit_jax.models import layers


def assert_matches(kernel_fn, reference_fn, args, argnums, dtype=jnp.float32):
  """Kernel vs reference: outputs and gradients, at the package's tolerances."""
  for d in parity.compare(kernel_fn, reference_fn, args, argnums, dtype):
    assert d.scale > 0, d.what
    assert d.ok, f"{d.what}: max |diff| {d.max_error:.3g} (scale {d.scale:.3g})"


_normal = parity.normal


# -----------------------------------------------------------------------------
# Linear attention
# -----------------------------------------------------------------------------

LINEAR_CASES = [
    # (backend, batch, q_tokens, kv_tokens, heads, head_dim, feature_map, normalize,
    #  dtype, block_tokens, chunk_blocks)
    ("triton", 1, 197, 197, 2, 32, "relu", True, jnp.float32, 64, 2),
    ("triton", 2, 37, 50, 1, 96, "elu+1", True, jnp.float32, 16, 2),
    ("triton", 1, 197, 197, 2, 64, "identity", False, jnp.bfloat16, None, None),
    ("tpu", 1, 197, 197, 2, 32, "elu+1", True, jnp.float32, 64, 2),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(
    str(getattr(x, "__name__", x)) for x in c))
def test_linear_attention_matches_reference(case):
  backend, b, nq, nk, h, d, fmap, normalize, dtype, block, chunk = case
  q, k, v = _normal(0, (b, nq, h, d)), _normal(1, (b, nk, h, d)), _normal(2, (b, nk, h, d))
  if fmap == "identity" and normalize:  # keep the denominator away from 0
    q, k = jnp.abs(q), jnp.abs(k)
  kernel = functools.partial(linear_pallas.linear_attention, feature_map=fmap,
                             normalize=normalize, backend=backend, block_tokens=block,
                             chunk_blocks=chunk)
  ref = functools.partial(linear_reference.linear_attention_reference, feature_map=fmap,
                          normalize=normalize)
  assert_matches(kernel, ref, (q, k, v), (0, 1, 2), dtype)


def test_linear_attention_reference_is_the_formula():
  """out_i = phi(q_i) S / (phi(q_i) . z + eps), token by token."""
  q, k, v = _normal(0, (1, 5, 1, 3)), _normal(1, (1, 7, 1, 3)), _normal(2, (1, 7, 1, 2))
  phi = lambda x: np.where(x > 0, x + 1, np.exp(x))
  pq, pk, vv = phi(np.asarray(q[0, :, 0])), phi(np.asarray(k[0, :, 0])), np.asarray(v[0, :, 0])
  s, z = pk.T @ vv, pk.sum(0)
  expected = (pq @ s) / (pq @ z + 1e-3)[:, None]
  out = kernels.linear_attention(q, k, v, feature_map="elu+1", eps=1e-3)
  np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-5)
  unnormalized = kernels.linear_attention(q, k, v, feature_map="elu+1", normalize=False)
  np.testing.assert_allclose(unnormalized[0, :, 0], pq @ s, rtol=1e-5)


def test_linear_attention_mosaic_gpu_matches_reference():
  """The Mosaic GPU kernel in GPU interpret mode: 70 query / 130 key tokens (partial
  64-token blocks, three gram chunks), head dim 48 (padded to 64), and elu+1, whose
  phi(0) = 1 makes the masking of padded tokens and features matter."""
  q, k, v = _normal(20, (1, 70, 2, 48)), _normal(21, (1, 130, 2, 48)), _normal(22, (1, 130, 2, 48))
  kernel = functools.partial(linear_mosaic_gpu.linear_attention, feature_map="elu+1",
                             chunk_blocks=1)
  ref = functools.partial(linear_reference.linear_attention_reference, feature_map="elu+1")
  assert_matches(kernel, ref, (q, k, v), (0, 1, 2), jnp.bfloat16)


def test_linear_attention_mosaic_gpu_refuses_float32():
  x = jnp.zeros((1, 8, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="takes bfloat16 or float16 .* use impl='xla'"):
    linear_mosaic_gpu.linear_attention(x, x, x)


# -----------------------------------------------------------------------------
# Global (flash) attention
# -----------------------------------------------------------------------------

FLASH_CASES = [
    # (backend, batch, q_tokens, kv_tokens, heads, head_dim, dtype, block_q, block_k)
    ("triton", 1, 197, 197, 2, 64, jnp.float32, None, None),
    ("triton", 2, 37, 53, 1, 96, jnp.float32, 16, 32),
    ("triton", 1, 197, 197, 2, 32, jnp.bfloat16, None, None),
    ("tpu", 1, 197, 197, 2, 32, jnp.float32, 64, 64),
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "-".join(
    str(getattr(x, "__name__", x)) for x in c))
def test_flash_attention_matches_reference(case):
  backend, b, nq, nk, h, d, dtype, block_q, block_k = case
  q, k, v = _normal(3, (b, nq, h, d)), _normal(4, (b, nk, h, d)), _normal(5, (b, nk, h, d))
  kernel = functools.partial(attention_pallas.flash_attention, backend=backend,
                             block_q=block_q, block_k=block_k)
  assert_matches(kernel, layers.dot_product_attention, (q, k, v), (0, 1, 2), dtype)


# -----------------------------------------------------------------------------
# Window attention
# -----------------------------------------------------------------------------

WINDOW_CASES = [
    # (backend, batch, height, width, heads, head_dim, window, mode, bias, swin mask, dtype)
    ("triton", 1, 14, 14, 2, 32, (7, 7), "block", True, True, jnp.float32),  # Swin-T-like
    ("triton", 2, 14, 7, 1, 96, (7, 7), "grid", True, False, jnp.float32),  # MaxViT grid
    ("triton", 1, 6, 4, 2, 64, (3, 2), "block", False, False, jnp.bfloat16),
    ("tpu", 1, 14, 14, 2, 32, (7, 7), "block", True, True, jnp.float32),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: "-".join(
    str(getattr(x, "__name__", x)) for x in c))
def test_window_attention_matches_reference(case):
  backend, b, height, width, heads, d, window, mode, with_bias, with_mask, dtype = case
  shape = (b, height, width, heads, d)
  q, k, v = _normal(6, shape), _normal(7, shape), _normal(8, shape)
  p = window[0] * window[1]
  bias = _normal(9, (heads, p, p)) if with_bias else None
  mask = jnp.asarray(bench._shift_mask(height, width, window[0])) if with_mask else None
  argnums = (0, 1, 2) + ((3,) if with_bias else ()) + ((4,) if with_mask else ())
  kernel = functools.partial(window_pallas.window_attention, window=window, mode=mode,
                             backend=backend)
  ref = functools.partial(window_reference.window_attention_reference, window=window,
                          mode=mode)
  call = lambda fn: (lambda q, k, v, bias, mask: fn(q, k, v, bias=bias, mask=mask))
  assert_matches(call(kernel), call(ref), (q, k, v, bias, mask), argnums, dtype)


def test_swin_shift_mask_blocks_the_wrapped_regions():
  mask = bench._shift_mask(14, 14, 7)
  assert mask.shape == (4, 49, 49)
  assert not mask[0].any()  # the top-left window never wraps
  assert (mask[3] == -100).sum() > 0 and (np.diagonal(mask, axis1=1, axis2=2) == 0).all()


# -----------------------------------------------------------------------------
# The kernels lower for CUDA (Triton) and TPU (Mosaic)
# -----------------------------------------------------------------------------

def _target(platform):
  """Lowering for CUDA without a GPU: JAX >= 0.11's Triton lowering asks the device
  for its compute capability, so name one (an H100) through an abstract mesh."""
  if platform != "cuda" or not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                       platform="gpu")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def _lowers(fn, args, platform):
  grad = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  with _target(platform):
    for f in (fn, grad):
      jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))


# Lowering the explicit Triton fallback makes JAX (>= 0.11) warn that the Triton
# lowering is deprecated: expected there, and only there.
TRITON_DEPRECATION = "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_gpu_and_tpu(backend, platform):
  tokens = jnp.zeros((2, 197, 3, 96), jnp.bfloat16)
  _lowers(functools.partial(linear_pallas.linear_attention, feature_map="elu+1",
                            backend=backend, interpret=False),
          (tokens, tokens, tokens), platform)
  _lowers(functools.partial(attention_pallas.flash_attention, backend=backend,
                            interpret=False), (tokens, tokens, tokens), platform)
  fmap = jnp.zeros((2, 14, 14, 3, 32), jnp.float32)
  bias, mask = jnp.zeros((3, 49, 49)), jnp.zeros((4, 49, 49))
  for mode in ("block", "grid"):
    _lowers(lambda q, k, v, mode=mode: window_pallas.window_attention(
        q, k, v, window=(7, 7), mode=mode, bias=bias, mask=mask, backend=backend,
        interpret=False), (fmap, fmap, fmap), platform)


def test_mosaic_gpu_kernel_lowers_for_cuda():
  """Forward and backward through the Mosaic GPU lowering (layouts, tilings, wgmma
  shapes), with 197 tokens and head dim 96."""
  tokens = jnp.zeros((2, 197, 3, 96), jnp.bfloat16)
  fn = functools.partial(linear_mosaic_gpu.linear_attention, feature_map="elu+1",
                         interpret=False)
  _lowers(fn, (tokens, tokens, tokens), "cuda")
  lowered = jax.jit(fn).trace(tokens, tokens, tokens).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()  # a Mosaic GPU custom call, not Triton
  assert "triton" not in lowered.as_text()


@pytest.mark.filterwarnings(TRITON_DEPRECATION)
def test_lowering_catches_what_triton_refuses(monkeypatch):
  """The lowering test is not vacuous: a 96-wide (non power-of-two) block fails."""
  from vit_jax.kernels import _backend  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_backend, "padded_head_dim", lambda d, backend: d)
  x = jnp.zeros((1, 64, 1, 96), jnp.float32)
  with pytest.raises(ValueError, match="power of 2"):
    _lowers(functools.partial(linear_pallas.linear_attention, backend="triton",
                              interpret=False), (x, x, x), "cuda")


# -----------------------------------------------------------------------------
# Dispatch and errors
# -----------------------------------------------------------------------------

def test_dispatch():
  assert kernels.resolve("auto", "linear") == "xla"  # CPU: the reference is fastest
  assert kernels.resolve("auto", "global", dtype=jnp.bfloat16) == "xla"
  assert kernels.resolve("pallas", "window") == "pallas"
  x = _normal(0, (1, 4, 1, 8))
  with pytest.raises(ValueError, match="unknown attention implementation 'triton'"):
    kernels.linear_attention(x, x, x, impl="triton")
  with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
    kernels.dot_product_attention(x, x, x, impl="cudnn")
  with pytest.raises(ValueError, match="takes no bias or mask"):
    kernels.dot_product_attention(x, x, x, bias=jnp.zeros((1, 1, 4, 4)), impl="pallas")
  # auto falls back to the reference when a bias is given.
  np.testing.assert_array_equal(
      kernels.dot_product_attention(x, x, x, bias=jnp.ones((1, 1, 4, 4)), impl="auto"),
      layers.dot_product_attention(x, x, x, bias=jnp.ones((1, 1, 4, 4))))


def test_auto_table_drives_the_choice_on_gpu(monkeypatch):
  """On a GPU, "auto" reads the table, and falls back to XLA where the table's choice
  cannot take the call; the Triton fallback is never chosen."""
  from vit_jax.kernels import _backend  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_backend, "platform", lambda: "gpu")
  bf16 = jnp.bfloat16
  assert kernels.resolve("auto", "global", dtype=bf16, head_dim=64) == "cudnn"
  assert kernels.resolve("auto", "global", dtype=bf16, head_dim=60) == "xla"  # not %8
  assert kernels.resolve("auto", "global", dtype=bf16, head_dim=64,
                         has_bias_or_mask=True) == "xla"
  assert kernels.resolve("auto", "global", dtype=jnp.float32, head_dim=64) == "xla"
  assert kernels.resolve("auto", "linear", dtype=bf16, head_dim=32) == "pallas"
  assert kernels.resolve("auto", "linear", dtype=jnp.float32, head_dim=32) == "xla"
  table = kernels.auto_table()["table"]
  # Explicit choices on GPU: window/global have no Mosaic GPU kernel.
  fmap = jnp.zeros((1, 4, 4, 1, 8))
  with pytest.raises(ValueError, match="no Mosaic GPU kernel for window attention"):
    kernels.window_attention(fmap, fmap, fmap, window=(2, 2), impl="pallas")
  for bad in ("fast", "pallas_triton", "auto"):  # the table never names the fallback
    with pytest.raises(ValueError, match=r"\[linear\]\[gpu\]\[half\] is .* must be one of"):
      kernels.check_auto_table({**table, "linear": {**table["linear"],
                                                    "gpu": {"float32": "xla", "half": bad}}})


def test_kernel_argument_errors():
  x = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="feature_map must be one of"):
    kernels.linear_attention(x, x, x, feature_map="softplus", impl="pallas")
  with pytest.raises(ValueError, match="powers of two, got 48"):
    linear_pallas.linear_attention(x, x, x, backend="triton", block_tokens=48)
  with pytest.raises(ValueError, match="multiples of 8, got 12"):
    linear_pallas.linear_attention(x, x, x, backend="tpu", block_tokens=12)
  with pytest.raises(ValueError, match="Pallas backend must be one of"):
    attention_pallas.flash_attention(x, x, x, backend="cpu")
  fmap = jnp.zeros((1, 14, 14, 2, 8))
  with pytest.raises(ValueError, match=r"bias must be \[heads, P, P\]"):
    window_pallas.window_attention(fmap, fmap, fmap, window=(7, 7),
                                   bias=jnp.zeros((2, 7, 7)))
  with pytest.raises(ValueError, match="cannot be cut into 4x4 block windows"):
    window_pallas.window_attention(fmap, fmap, fmap, window=(4, 4))


# -----------------------------------------------------------------------------
# Model level: ViT with xla and pallas attention
# -----------------------------------------------------------------------------

# 56 / 4 = 14 x 14 patches + class token = 197 tokens, as ViT-B/16 at 224.
VIT_TINY = dict(image_size=56, patch_size=4, hidden_size=64, num_layers=1, num_heads=2,
                mlp_dim=64, num_classes=10, head_zeroinit=False)


def _random_variables(model, shape):
  """Random parameters from the abstract init (compiling ``init`` costs seconds)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.randn(*a.shape), jnp.float32),
                      abstract)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_vit_logits_and_gradients_do_not_depend_on_the_implementation(attention):
  images = _normal(10, (1, 56, 56, 3))
  model = models.create("vit_tiny_patch16_224", attention=attention, **VIT_TINY)
  variables = _random_variables(model, images.shape)
  probe = _normal(11, (1, 10))
  results = {}
  for impl in ("xla", "pallas"):
    m = models.create("vit_tiny_patch16_224", attention=attention, attention_impl=impl,
                      **VIT_TINY)

    def loss(p, m=m):
      logits = m.apply(p, images)
      return jnp.sum(logits * probe), logits

    results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  (_, logits_x), grads_x = results["xla"]
  (_, logits_p), grads_p = results["pallas"]
  assert np.abs(logits_x).mean() > 0.1
  np.testing.assert_allclose(logits_p, logits_x, atol=1e-4)
  for (path, gx), gp in zip(jax.tree_util.tree_flatten_with_path(grads_x)[0],
                            jax.tree.leaves(grads_p)):
    scale = max(1.0, float(np.abs(gx).max()))
    np.testing.assert_allclose(gp, gx, atol=1e-4 * scale, err_msg=str(path))


# The hierarchical families route every window through kernels.window_attention.
# Swin: 8x8 patch map in 4x4 windows, second block shifted (the mask); MaxViT: block
# and grid partitions of 2 with relative-position biases.
WINDOWED = {
    "swin_tiny_patch4_window7_224": dict(
        image_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
        window_size=4, num_classes=10, head_zeroinit=False),
    "maxvit_tiny_tf_224": dict(
        image_size=32, window_size=2, stem_width=8, embed_dims=(16, 32), depths=(1, 1),
        dim_head=8, head_hidden_size=16, num_classes=10, head_zeroinit=False),
}


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_models_do_not_depend_on_the_implementation(name):
  images = _normal(12, (2, 32, 32, 3))
  model = models.create(name, **WINDOWED[name])
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    values = 0.3 * rng.randn(*leaf.shape)
    if "var" in jax.tree_util.keystr(path):  # BatchNorm running variances stay positive
      values = 1.0 + np.abs(values)
    return jnp.asarray(values, jnp.float32)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  probe = _normal(13, (2, 10))
  results = {}
  for impl in ("xla", "pallas"):
    m = models.create(name, attention_impl=impl, **WINDOWED[name])

    def loss(params, m=m):
      logits = m.apply({**variables, "params": params}, images)
      return jnp.sum(logits * probe), logits

    results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  (_, logits_x), grads_x = results["xla"]
  (_, logits_p), grads_p = results["pallas"]
  assert np.abs(logits_x).mean() > 0.1
  np.testing.assert_allclose(logits_p, logits_x, atol=1e-4)
  for (path, gx), gp in zip(jax.tree_util.tree_flatten_with_path(grads_x)[0],
                            jax.tree.leaves(grads_p)):
    scale = max(1.0, float(np.abs(gx).max()))
    np.testing.assert_allclose(gp, gx, atol=1e-4 * scale, err_msg=str(path))


def test_vit_attention_options():
  base = models.create("vit_tiny_patch16_224", **VIT_TINY)
  linear = models.create("vit_tiny_patch16_224", attention="linear", **VIT_TINY)
  images = _normal(10, (1, 56, 56, 3))
  variables = _random_variables(base, images.shape)
  # Same parameters, different attention.
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(linear.init, jax.random.key(0), images))
  assert not np.allclose(base.apply(variables, images), linear.apply(variables, images))
  with pytest.raises(ValueError, match="attention must be 'softmax' or 'linear'"):
    models.create("vit_tiny_patch16_224", attention="performer", **VIT_TINY).apply(
        variables, images)
  with pytest.raises(ValueError, match="no attention weights to drop"):
    models.create("vit_tiny_patch16_224", attention="linear",
                  attention_dropout_rate=0.1, **VIT_TINY).apply(variables, images)
  with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
    models.create("vit_tiny_patch16_224", attention_impl="fast", **VIT_TINY).apply(
        variables, images)


# -----------------------------------------------------------------------------
# Benchmark command
# -----------------------------------------------------------------------------

def _bench(argv):
  """``python -m vit_jax.kernels.bench ARGV`` in this process; its flags are defined
  for the call and removed after (as ``helpers.run_command`` does for commands)."""
  before = set(flags.FLAGS)
  bench.define_flags()
  try:
    flags.FLAGS(["bench"] + argv)
    return bench.run(bench.config_from_flags())
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)


def test_benchmark_runs_and_reports_positive_numbers(tmp_path, capsys):
  rows = _bench(["--quick", "--ops=linear,window", "--impls=xla,pallas",
                 "--repeats=1", f"--json={tmp_path / 'rows.json'}"])
  printed = capsys.readouterr().out
  assert "| op | shape | impl |" in printed
  measured = [r for r in rows if r.impl == "xla"]
  assert {(r.op, r.passes) for r in measured} >= {
      ("linear", "fwd"), ("linear", "fwd+bwd"), ("window", "fwd"), ("window", "fwd+bwd")}
  for r in measured:
    assert r.time_ms > 0 and r.tflops > 0 and r.gbps > 0 and r.peak_mib > 0, r
  # On CPU, Pallas rows are never passed off as speed measurements.
  pallas = [r for r in rows if r.impl == "pallas"]
  assert pallas and all(r.time_ms is None and "interpret mode" in r.note for r in pallas)
  assert (tmp_path / "rows.json").exists()
  # The memory guard: what would not fit is compiled and reported, never run.
  guarded = _bench(["--quick", "--ops=linear", "--impls=xla", "--passes=fwd",
                    "--max_gib=1e-6"])
  assert guarded and all(r.time_ms is None and r.peak_mib > 0 and "not run" in r.note
                         for r in guarded)
  with pytest.raises(app.UsageError, match="unknown --ops softmax; choose from global"):
    _bench(["--ops=softmax"])


def test_kernels_import_nothing_from_models():
  """The specifications live in the kernels package: importing every kernel (and the
  benchmark) and running the global-attention reference loads no model family (a
  fresh interpreter, as a user's would be)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from helpers import subprocess_env  # pylint: disable=g-import-not-at-top
  code = ("import sys; import vit_jax.kernels, vit_jax.kernels.bench; "
          "from vit_jax.kernels.attention import pallas; "
          "from vit_jax.kernels.linear_attention import pallas; "
          "from vit_jax.kernels.window_attention import pallas; "
          "import jax.numpy as jnp; x = jnp.ones((1, 3, 2, 4)); "
          "vit_jax.kernels.dot_product_attention(x, x, x, impl='xla'); "
          "print(sorted(m for m in sys.modules if m.startswith('vit_jax.models')))")
  proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]", proc.stdout
