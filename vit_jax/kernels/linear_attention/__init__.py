"""Non-causal linear attention: reference (the spec) and Pallas kernels."""

from vit_jax.kernels.linear_attention.reference import (FEATURE_MAPS, feature_map,
                                                        linear_attention_reference)
