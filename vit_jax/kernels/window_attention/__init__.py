"""Windowed (block/grid) attention: reference (the spec) and the Pallas kernel."""

from vit_jax.kernels.window_attention.reference import (partition, unpartition,
                                                        window_attention_reference)
