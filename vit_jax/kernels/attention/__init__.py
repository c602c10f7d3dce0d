"""Global softmax attention: the reference (the spec) and a flash-style Pallas kernel."""

from vit_jax.kernels.attention.reference import attention_reference
