"""Attention operations with a pure-JAX reference and selectable implementations.

Models call these with ``impl`` from their config:

- ``"xla"``: the reference, plain JAX (the specification; runs everywhere).
- ``"pallas"``: this package's kernels on the platform's supported Pallas path:
  Mosaic on TPU; Mosaic GPU (``plgpu.kernel``) on GPU, which exists for linear
  attention in bfloat16/float16 (window and global attention on GPU use ``"auto"``:
  XLA or cuDNN); on CPU, the ``pallas_call`` kernels in interpret mode (slow: for
  tests).
- ``"pallas_triton"``: the ``pallas_call`` kernels through Pallas' Triton lowering,
  which JAX deprecates: an explicit fallback on GPU, never chosen by ``"auto"``.
- ``"cudnn"`` (global attention only, GPU only): ``jax.nn.dot_product_attention``
  with ``implementation="cudnn"``.
- ``"auto"``: looked up per (operation, platform, precision) in
  ``auto_table.json``, one file that a device-check run rewrites
  (``python -m vit_jax.tools.device_check``; see ``docs/gpu.md``). Where the table's
  choice cannot take the call (cuDNN needs half precision and a head dim that is a
  multiple of 8 up to 128; the Mosaic GPU kernel needs half precision; the fused
  global paths take no bias or mask) it falls back to ``"xla"``. Until a GPU run
  replaces them, the table's GPU/TPU entries are the design's defaults, not
  measurements.

Every implementation matches the reference in forward and gradient (tests in
``tests/test_kernels.py``).
"""

import functools
import json
import pathlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vit_jax.kernels import _backend
from vit_jax.kernels.attention import reference as _attention_reference
from vit_jax.kernels.linear_attention import reference as _linear_reference
from vit_jax.kernels.window_attention import reference as _window_reference

IMPLEMENTATIONS = ("xla", "pallas", "pallas_triton", "auto")
_GLOBAL_IMPLEMENTATIONS = IMPLEMENTATIONS + ("cudnn",)
OPS = ("global", "window", "linear")
PLATFORMS = ("cpu", "gpu", "tpu")
PRECISIONS = ("float32", "half")
AUTO_TABLE_PATH = pathlib.Path(__file__).with_name("auto_table.json")


def _check_impl(impl: str, allowed=IMPLEMENTATIONS) -> None:
  if impl not in allowed:
    raise ValueError(f"unknown attention implementation {impl!r}; "
                     f"available: {', '.join(allowed)}")


def check_auto_table(table: dict) -> None:
  """Raises if ``table`` is not ``{op: {platform: {precision: impl}}}`` over known names.

  Neither ``"auto"`` nor the deprecated ``"pallas_triton"`` lowering may be an entry.
  """
  for op in OPS:
    allowed = [i for i in (_GLOBAL_IMPLEMENTATIONS if op == "global" else IMPLEMENTATIONS)
               if i not in ("auto", "pallas_triton")]
    for platform in PLATFORMS:
      for precision in PRECISIONS:
        impl = table.get(op, {}).get(platform, {}).get(precision)
        if impl not in allowed:
          raise ValueError(f"auto table entry [{op}][{platform}][{precision}] is {impl!r}; "
                           f"it must be one of {', '.join(allowed)}")


@functools.cache
def auto_table() -> dict:
  """``auto_table.json``: ``{"source", "device", "table": {op: {platform: {precision}}}}``."""
  data = json.loads(AUTO_TABLE_PATH.read_text())
  check_auto_table(data["table"])
  return data


def _precision(dtype) -> str:
  half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return "half" if half else "float32"


def _can_take(impl: str, op: str, platform: str, precision: str,
              head_dim: Optional[int], has_bias_or_mask: bool) -> bool:
  """Whether ``impl`` supports this call (``"auto"`` falls back to XLA if not)."""
  if impl in ("xla", "pallas_triton"):
    return True
  if impl == "cudnn":
    return (platform == "gpu" and precision == "half" and not has_bias_or_mask
            and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)))
  # "pallas"
  if platform == "gpu":
    return op == "linear" and precision == "half"
  return not (op == "global" and has_bias_or_mask)


def resolve(impl: str, op: str = "window", *, dtype=None, head_dim: Optional[int] = None,
            has_bias_or_mask: bool = False, has_segment_ids: bool = False) -> str:
  """The implementation ``impl`` stands for here: never ``"auto"``."""
  _check_impl(impl, _GLOBAL_IMPLEMENTATIONS if op == "global" else IMPLEMENTATIONS)
  if impl != "auto":
    return impl
  platform, precision = _backend.platform(), _precision(dtype)
  choice = auto_table()["table"][op][platform][precision]
  if has_segment_ids and choice == "cudnn":
    return "xla"
  if _can_take(choice, op, platform, precision, head_dim, has_bias_or_mask):
    return choice
  return "xla"


def _no_mosaic_gpu_kernel(op: str):
  return ValueError(f"there is no Mosaic GPU kernel for {op} attention; on GPU use "
                    "impl='auto' (XLA or cuDNN), 'xla', or 'pallas_triton' (Pallas' "
                    "deprecated Triton lowering)")


def _pallas_call_backend(impl: str):
  """``backend=`` for the ``pallas_call`` kernels under ``impl``."""
  if impl == "pallas_triton":
    if _backend.platform() == "tpu":
      raise ValueError("impl='pallas_triton' is a GPU fallback; on TPU use 'pallas'")
    return "triton"
  return None  # the platform's configuration


def window_attention(query, key, value, *, window: tuple[int, int], mode: str = "block",
                     bias=None, mask=None, impl: str = "xla"):
  """Softmax attention inside block or grid windows of ``[B, H, W, heads, head_dim]``.

  See ``vit_jax.kernels.window_attention.reference`` for the exact semantics.
  """
  impl = resolve(impl, "window", dtype=query.dtype, head_dim=query.shape[-1])
  if impl == "xla":
    return _window_reference.window_attention_reference(
        query, key, value, window=window, mode=mode, bias=bias, mask=mask)
  if impl == "pallas" and _backend.platform() == "gpu":
    raise _no_mosaic_gpu_kernel("window")
  from vit_jax.kernels.window_attention import pallas  # pylint: disable=g-import-not-at-top
  return pallas.window_attention(query, key, value, window=window, mode=mode,
                                 bias=bias, mask=mask, backend=_pallas_call_backend(impl))


def linear_attention(query, key, value, *, feature_map: str = "relu",
                     normalize: bool = True, eps: float = 1e-5, impl: str = "xla"):
  """Non-causal linear attention over ``[batch, tokens, heads, head_dim]``.

  See ``vit_jax.kernels.linear_attention.reference`` for the exact semantics.
  """
  impl = resolve(impl, "linear", dtype=query.dtype, head_dim=query.shape[-1])
  if impl == "xla":
    return _linear_reference.linear_attention_reference(
        query, key, value, feature_map=feature_map, normalize=normalize, eps=eps)
  if impl == "pallas" and _backend.platform() == "gpu":
    from vit_jax.kernels.linear_attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
    return mosaic_gpu.linear_attention(query, key, value, feature_map=feature_map,
                                       normalize=normalize, eps=eps)
  from vit_jax.kernels.linear_attention import pallas  # pylint: disable=g-import-not-at-top
  return pallas.linear_attention(query, key, value, feature_map=feature_map,
                                 normalize=normalize, eps=eps,
                                 backend=_pallas_call_backend(impl))


def dot_product_attention(query, key, value, *, bias=None, mask=None,
                          segment_ids=None, impl: str = "xla"):
  """Global softmax attention, ``[batch, tokens, heads, head_dim]``.

  ``"xla"`` is the reference (``kernels.attention.reference``); ``"cudnn"`` is
  cuDNN's fused attention on GPU; ``"pallas"`` (TPU, or interpret mode on CPU) and
  ``"pallas_triton"`` are the flash kernel (no ``bias``/``mask``: it masks only its
  own padding and, given ``segment_ids``, pairs of tokens in different segments).
  ``segment_ids`` (packed sequences) make ``"auto"`` pick XLA or the flash kernel,
  never cuDNN here (its packed-sequence API is not wired).
  """
  impl = resolve(impl, "global", dtype=query.dtype, head_dim=query.shape[-1],
                 has_bias_or_mask=bias is not None or mask is not None,
                 has_segment_ids=segment_ids is not None)
  if impl == "xla":
    return _attention_reference.attention_reference(query, key, value, bias=bias,
                                                    mask=mask, segment_ids=segment_ids)
  if impl == "cudnn" and segment_ids is not None:
    raise ValueError("attention implementation 'cudnn' takes no segment_ids here; use "
                     "'xla' or 'auto'")
  if impl == "cudnn":
    if _backend.platform() != "gpu":
      raise ValueError("attention implementation 'cudnn' needs a GPU; this process "
                       f"runs on {_backend.platform()!r}")
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation="cudnn")
  if impl == "pallas" and _backend.platform() == "gpu":
    raise _no_mosaic_gpu_kernel("global")
  if bias is not None or mask is not None:
    raise ValueError("the Pallas flash-attention kernel takes no bias or mask; use "
                     "impl='xla' (or 'auto', which falls back to it)")
  from vit_jax.kernels.attention import pallas  # pylint: disable=g-import-not-at-top
  return pallas.flash_attention(query, key, value, backend=_pallas_call_backend(impl),
                                segment_ids=segment_ids)


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


__all__ = ["IMPLEMENTATIONS", "OPS", "resolve", "auto_table", "check_auto_table", "window_attention", "linear_attention",
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
  Pallas kernel for it (nor a Triton one: ``"pallas_triton"`` is an error).
  """
  _check_impl(impl, ("xla", "pallas", "auto"))
  if impl == "auto":
    impl = "pallas" if _backend.platform() == "tpu" else "xla"
  if impl == "pallas":
    from vit_jax.kernels.gated_scan import pallas  # pylint: disable=g-import-not-at-top
    return pallas.gated_scan(query, key, value, log_decay, reverse=reverse, chunk=chunk)
  return _gated_chunked.gated_scan(query, key, value, log_decay, reverse=reverse, chunk=chunk)


__all__ += ["gated_scan"]
