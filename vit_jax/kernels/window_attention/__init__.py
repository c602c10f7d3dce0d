"""Windowed (block/grid) attention: reference; fused implementations plug in here."""

from vit_jax.kernels.window_attention.reference import (partition, unpartition,
                                                        window_attention_reference)
