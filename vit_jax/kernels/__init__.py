"""Attention operations with a pure-JAX reference and selectable implementations.

Models call these with ``impl`` from their config:

- ``"xla"``: the reference, plain JAX (the specification; runs everywhere).
- ``"pallas"``: the Pallas kernels of this package (compiled on GPU and TPU,
  interpret mode on CPU, where they are slow: use them there only for testing).
- ``"auto"``: a per-backend default: ``"xla"`` on CPU, the fused paths on GPU/TPU
  (``"cudnn"`` for half-precision global attention on GPU, ``"pallas"`` otherwise).
  These GPU/TPU defaults were chosen from the design, not from measurements: no
  GPU or TPU was available when they were written (see ``docs/kernels.md``).
- ``"cudnn"`` (global attention only, GPU only): ``jax.nn.dot_product_attention``
  with ``implementation="cudnn"``.

Every implementation matches the reference in forward and gradient (tests in
``tests/test_kernels.py``).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from vit_jax.kernels import _backend
from vit_jax.kernels.attention import reference as _attention_reference
from vit_jax.kernels.linear_attention import reference as _linear_reference
from vit_jax.kernels.window_attention import reference as _window_reference

IMPLEMENTATIONS = ("xla", "pallas", "auto")
_GLOBAL_IMPLEMENTATIONS = IMPLEMENTATIONS + ("cudnn",)


def _check_impl(impl: str, allowed=IMPLEMENTATIONS) -> None:
  if impl not in allowed:
    raise ValueError(f"unknown attention implementation {impl!r}; "
                     f"available: {', '.join(allowed)}")


def resolve(impl: str, op: str = "window", *, dtype=None,
            has_bias_or_mask: bool = False) -> str:
  """The implementation ``impl`` stands for here: ``"xla"``, ``"pallas"`` or ``"cudnn"``."""
  _check_impl(impl, _GLOBAL_IMPLEMENTATIONS if op == "global" else IMPLEMENTATIONS)
  if impl != "auto":
    return impl
  here = _backend.platform()
  if here not in _backend.BACKENDS:
    return "xla"
  if op == "global":
    if has_bias_or_mask:
      return "xla"
    half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if here == "gpu" and half else "pallas"
  return "pallas"


def window_attention(query, key, value, *, window: tuple[int, int], mode: str = "block",
                     bias=None, mask=None, impl: str = "xla"):
  """Softmax attention inside block or grid windows of ``[B, H, W, heads, head_dim]``.

  See ``vit_jax.kernels.window_attention.reference`` for the exact semantics.
  """
  impl = resolve(impl, "window")
  if impl == "pallas":
    from vit_jax.kernels.window_attention import pallas  # pylint: disable=g-import-not-at-top
    return pallas.window_attention(query, key, value, window=window, mode=mode,
                                   bias=bias, mask=mask)
  return _window_reference.window_attention_reference(
      query, key, value, window=window, mode=mode, bias=bias, mask=mask)


def linear_attention(query, key, value, *, feature_map: str = "relu",
                     normalize: bool = True, eps: float = 1e-5, impl: str = "xla"):
  """Non-causal linear attention over ``[batch, tokens, heads, head_dim]``.

  See ``vit_jax.kernels.linear_attention.reference`` for the exact semantics.
  """
  impl = resolve(impl, "linear")
  if impl == "pallas":
    from vit_jax.kernels.linear_attention import pallas  # pylint: disable=g-import-not-at-top
    return pallas.linear_attention(query, key, value, feature_map=feature_map,
                                   normalize=normalize, eps=eps)
  return _linear_reference.linear_attention_reference(
      query, key, value, feature_map=feature_map, normalize=normalize, eps=eps)


def dot_product_attention(query, key, value, *, bias=None, mask=None,
                          impl: str = "xla"):
  """Global softmax attention, ``[batch, tokens, heads, head_dim]``.

  ``"xla"`` is ``vit_jax.kernels.attention.attention_reference``; ``"pallas"`` is the
  flash kernel (no ``bias``/``mask``: it masks only its own padding); ``"cudnn"``
  is cuDNN's fused attention on GPU.
  """
  impl = resolve(impl, "global", dtype=query.dtype,
                 has_bias_or_mask=bias is not None or mask is not None)
  if impl == "xla":
    return _attention_reference.attention_reference(query, key, value, bias=bias,
                                                    mask=mask)
  if impl == "cudnn":
    if _backend.platform() != "gpu":
      raise ValueError("attention implementation 'cudnn' needs a GPU; this process "
                       f"runs on {_backend.platform()!r}")
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation="cudnn")
  if bias is not None or mask is not None:
    raise ValueError("the Pallas flash-attention kernel takes no bias or mask; use "
                     "impl='xla' (or 'auto', which falls back to it)")
  from vit_jax.kernels.attention import pallas  # pylint: disable=g-import-not-at-top
  return pallas.flash_attention(query, key, value)


def attention_fn(impl: str = "xla") -> Callable:
  """An ``attention_fn`` for ``layers.MultiHeadDotProductAttention``."""
  _check_impl(impl, _GLOBAL_IMPLEMENTATIONS)
  return functools.partial(dot_product_attention, impl=impl)


def _linear_attention_fn(query, key, value, *, bias=None, mask=None, impl="xla",
                         feature_map="elu+1", normalize=True, eps=1e-6):
  if bias is not None or mask is not None:
    raise ValueError("linear attention takes no attention bias or mask")
  return linear_attention(query, key, value, feature_map=feature_map,
                          normalize=normalize, eps=eps, impl=impl)


def linear_attention_fn(impl: str = "xla", *, feature_map: str = "elu+1",
                        normalize: bool = True, eps: float = 1e-6) -> Callable:
  """Linear attention as an ``attention_fn`` for ``MultiHeadDotProductAttention``."""
  _check_impl(impl)
  if feature_map not in _linear_reference.FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {_linear_reference.FEATURE_MAPS}, "
                     f"got {feature_map!r}")
  return functools.partial(_linear_attention_fn, impl=impl, feature_map=feature_map,
                           normalize=normalize, eps=eps)


__all__ = ["IMPLEMENTATIONS", "resolve", "window_attention", "linear_attention",
           "dot_product_attention", "attention_fn", "linear_attention_fn"]


# Imported before the function is defined, which it must shadow (the package's
# ``gated_scan`` attribute would otherwise become the subpackage on first import).
from vit_jax.kernels.gated_scan import chunked as _gated_chunked  # pylint: disable=g-import-not-at-top,g-bad-import-order


def gated_scan(query, key, value, log_decay, *, reverse: bool = False,
               impl: str = "xla", chunk=None):
  """Gated linear recurrence over ``[batch, tokens, heads, dim]`` (GLA, retention, Mamba).

  ``h_t = diag(exp(g_t)) h_{t-1} + k_t^T v_t``, ``o_t = q_t h_t`` (``reverse``: from the
  last token); see ``vit_jax.kernels.gated_scan.reference``. ``"xla"`` is the chunked
  form with a hand-written backward; ``"pallas"`` the Mosaic TPU kernels (interpret
  mode on CPU); ``"auto"`` picks Pallas on TPU and XLA elsewhere: there is no GPU
  Pallas kernel for it.
  """
  _check_impl(impl)
  if impl == "auto":
    impl = "pallas" if _backend.platform() == "tpu" else "xla"
  if impl == "pallas":
    from vit_jax.kernels.gated_scan import pallas  # pylint: disable=g-import-not-at-top
    return pallas.gated_scan(query, key, value, log_decay, reverse=reverse, chunk=chunk)
  return _gated_chunked.gated_scan(query, key, value, log_decay, reverse=reverse, chunk=chunk)


__all__ += ["gated_scan"]
