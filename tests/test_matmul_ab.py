"""vit_jax.tools.matmul_ab: XLA's and PyTorch's dense-layer products side by side."""

import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, subprocess_env
from vit_jax.tools import matmul_ab


def run(*args):
  # Its own process: this one has imported the module (runpy would warn running it here).
  proc = subprocess.run([sys.executable, "-m", "vit_jax.tools.matmul_ab", *args], cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


def test_parse_shapes():
  assert matmul_ab.parse_shapes("1576x192x768, 8X4x2") == [(1576, 192, 768), (8, 4, 2)]
  for bad in ("1576x192", "1576x192x0", "ax2x3", "1x2x3x4"):
    with pytest.raises(ValueError, match="--shapes: expected MxKxN"):
      matmul_ab.parse_shapes(bad)


def test_products_are_a_dense_layers_forward_and_gradients():
  rng = np.random.default_rng(0)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((7, 5), (5, 3), (7, 3)))
  got = {k: np.asarray(f(x, w, g)) for k, f in matmul_ab.jax_products().items()}
  np.testing.assert_allclose(got["forward"], x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["input_grad"], g @ w.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["weight_grad"], x.T @ g, rtol=1e-5, atol=1e-5)


def test_command_times_both_sides_for_every_shape_and_product():
  code, out, err = run("--shapes=64x16x32,40x8x24", "--repeats=2", "--threads=1")
  assert code == 0, err[-3000:]
  assert out.startswith("host: ") and "on 1 threads" in out
  num = r"([\d.eE+-]+)"
  rows = re.findall(rf"^\s+(\d+x\d+x\d+)\s+(\w+)\s+{num}\s+{num}\s+{num}\s+{num}\s+{num}x$",
                    out, re.M)
  assert [(r[0], r[1]) for r in rows] == [
      (s, p) for s in ("64x16x32", "40x8x24") for p in matmul_ab.PRODUCTS]
  for shape, _, *values in rows:
    xla_ms, torch_ms, xla_gflops, torch_gflops, ratio = map(float, values)
    flop = 2 * np.prod([int(d) for d in shape.split("x")])
    assert xla_ms > 0 and torch_ms > 0, (shape, values)
    # Columns printed to 4 significant digits (3 for the ratio) agree with each other.
    np.testing.assert_allclose(xla_gflops, flop / xla_ms / 1e6, rtol=2e-3)
    np.testing.assert_allclose(torch_gflops, flop / torch_ms / 1e6, rtol=2e-3)
    np.testing.assert_allclose(ratio, torch_ms / xla_ms, rtol=1e-2)


def test_bad_shapes_are_a_usage_error():
  code, _, err = run("--shapes=64x16")
  assert code != 0 and "--shapes: expected MxKxN" in err, err[-3000:]
