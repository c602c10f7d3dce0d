"""Input pipelines: TFDS datasets by name, offline builders, preprocessing ops."""

import os

# TensorFlow runs only input pipelines here, and their parallelism is tf.data's private
# threads (``input_pipeline.dataset_options``). Its intra-op pool (one thread per CPU)
# still took about half of the pipelines' op work, so K pinned CPUs ran 2K busy
# threads and twice the context switches (README, "Input pipeline speed"). Read when
# TensorFlow's runtime starts (the first op), so this must come before any; a value
# the user set is kept.
USER_INTRAOP_THREADS = os.environ.get("TF_NUM_INTRAOP_THREADS")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

from vit_jax.data import digits  # noqa: E402,F401  (registers the offline builders)
from vit_jax.data import randaugment  # noqa: E402,F401  (registers the `randaug` op)
