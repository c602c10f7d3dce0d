"""Hierarchical models name the per-stage setting whose length does not fit."""

import jax
import jax.numpy as jnp
import pytest

from vit_jax import models

# (model, a per-stage setting given one entry too few, image side)
CASES = [
    ("pvt_v2_b0", "num_heads", (1, 2, 5), 64),
    ("pvt_tiny", "sr_ratios", (8, 4, 2), 64),
    ("cswin_tiny_224", "split_sizes", (1, 2, 7), 224),
    ("shvit_s1", "qk_dims", (16, 16), 224),
    ("efficientvit_m0", "window_sizes", (7, 7), 224),
]


@pytest.mark.parametrize("name,field,value,side", CASES, ids=[c[0] for c in CASES])
def test_a_per_stage_setting_of_the_wrong_length_is_named(name, field, value, side):
  model = models.create(name, **{field: value})
  images = jnp.zeros((1, side, side, 3))
  with pytest.raises(ValueError, match=rf"\.{field}=\(.*\) has {len(value)} entries; "
                                       r"the model has \d stages"):
    jax.eval_shape(model.init, jax.random.key(0), images)
