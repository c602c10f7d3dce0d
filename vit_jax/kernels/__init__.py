"""Attention operations with a pure-JAX reference and selectable implementations.

Models call these with ``impl`` from their config. ``"xla"`` is the reference (the
specification); fused implementations must match it in forward and gradient.
"""


from vit_jax.kernels.window_attention import reference as _window_reference

IMPLEMENTATIONS = ("xla",)


def window_attention(query, key, value, *, window: tuple[int, int], mode: str = "block",
                     bias=None, mask=None, impl: str = "xla"):
  """Softmax attention inside block or grid windows of ``[B, H, W, heads, head_dim]``.

  See ``vit_jax.kernels.window_attention.reference`` for the exact semantics.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; "
                     f"available: {', '.join(IMPLEMENTATIONS)}")
  return _window_reference.window_attention_reference(
      query, key, value, window=window, mode=mode, bias=bias, mask=mask)


