"""Position-table resampling, at its home ``vit_jax.weights.resample`` (README name)."""

from vit_jax.weights.resample import (PATCH_KERNEL_METHODS, resample_posemb, resize_grid,
                                      resize_patch_kernel, resize_rel_pos_bias_table)

__all__ = ["PATCH_KERNEL_METHODS", "resample_posemb", "resize_grid", "resize_patch_kernel",
           "resize_rel_pos_bias_table"]
