"""Global softmax attention: reference (``layers.dot_product_attention``) and a
flash-style Pallas kernel."""

from vit_jax.kernels.attention.reference import attention_reference
