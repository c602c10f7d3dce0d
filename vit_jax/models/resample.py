"""Position-table resampling, at its home ``vit_jax.weights.resample`` (README name)."""

from vit_jax.weights.resample import resample_posemb, resize_grid, resize_rel_pos_bias_table

__all__ = ["resample_posemb", "resize_grid", "resize_rel_pos_bias_table"]
