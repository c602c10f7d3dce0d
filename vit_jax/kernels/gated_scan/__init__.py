"""Gated linear recurrences: the reference (the spec), XLA's chunked form with a
hand-written VJP (CPU and GPU), and Pallas kernels for TPU (Mosaic).

There is no GPU Pallas kernel: Pallas' Triton lowering is deprecated and a Mosaic GPU
kernel has not been written, so ``vit_jax.kernels.gated_scan(..., impl="auto")`` runs
the XLA chunked form on GPU.
"""

from vit_jax.kernels.gated_scan.reference import (default_chunk, gated_scan_naive,
                                                  gated_scan_reference)
