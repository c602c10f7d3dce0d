"""filter_pool's score histogram PNG (the full filtering run is in test_contrastive_train)."""

import io

import numpy as np
from PIL import Image

from vit_jax.tools.filter_pool import score_histogram_png


def test_histogram_marks_the_threshold_and_stacks_bad_pairs():
  png = score_histogram_png([0.1, 0.2, 0.2, 0.3], [0.05, 0.3], 0.2, bins=5,
                            size=(240, 120))
  image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
  assert image.shape == (120, 240, 3)
  colour = lambda rgb: np.all(image == rgb, axis=-1)
  red_columns = np.unique(np.nonzero(colour((220, 0, 0)))[1])
  # The threshold 0.2 sits at 0.6 of the 0.05..0.3 range of the 190-pixel plot.
  assert set(red_columns) <= {40 + 114, 40 + 115} and len(red_columns) >= 1
  blue, orange = colour((70, 110, 200)), colour((240, 150, 40))
  assert blue.sum() > 0 and orange.sum() > 0
  # Bad pairs fill the first bin (0.05) alone, and stack on the last one (0.3).
  assert orange[:, 41:75].any() and not blue[:, 41:75].any()
  assert orange[:, 200:229].any() and blue[:, 200:229].any()
