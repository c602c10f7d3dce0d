"""Input pipelines: TFDS datasets by name, offline builders, preprocessing ops."""

from vit_jax.data import digits  # noqa: F401  (registers the offline builders)
from vit_jax.data import randaugment  # noqa: F401  (registers the `randaug` op)
