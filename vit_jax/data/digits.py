"""``digits``: the 8x8 handwritten digits that ship inside scikit-learn, as a TFDS dataset.

``digit_scenes``: the same split, each digit drawn once as a 256x256 JPEG scene (the
offline image-text pool's renderer), for measuring input pipelines at ImageNet-like
resolution (``python -m vit_jax.data.benchmark --dataset=digit_scenes``).

They need no network, so the demo and the tests can build them anywhere:
``tfds.builder("digits").download_and_prepare(file_format="array_record")`` (the input
pipeline does this on first use; ArrayRecord files let training resume without
re-reading). 1,797 grayscale images, 10 classes; a fixed stratified split holds out
360 images (20%) as ``test``. Pixels are scikit-learn's 0..16 counts scaled to 0..255.
"""

import numpy as np
import tensorflow_datasets as tfds


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (UCI ML optical recognition, 8x8)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 1437/360 train/test split, seed 0.",
                   "1.1.0": "Prepared as ArrayRecord files (random access)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    from vit_jax.data import digit_pool  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    train, test = digit_pool.split_indices(digits.target)
    return {
        "train": self._generate_examples(images, digits.target, train),
        "test": self._generate_examples(images, digits.target, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


class DigitScenes(tfds.core.GeneratorBasedBuilder):
  """The digits as 256x256 JPEG scenes: a coloured digit on a coloured background."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One rendering per digit, seed 0, JPEG quality 95."}
  IMAGE_SIZE = 256

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(self.IMAGE_SIZE, self.IMAGE_SIZE, 3),
                                         encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    from vit_jax.data import digit_pool  # pylint: disable=g-import-not-at-top
    train_images, train_labels, test_images, test_labels = digit_pool.digits_split()
    return {"train": self._generate_examples(train_images, train_labels, seed=0),
            "test": self._generate_examples(test_images, test_labels, seed=1)}

  def _generate_examples(self, images, labels, seed):
    from vit_jax.data import digit_pool  # pylint: disable=g-import-not-at-top
    for i, (digit, label) in enumerate(zip(images, labels)):
      image, _ = digit_pool.render(digit, np.random.default_rng([seed, i]), self.IMAGE_SIZE)
      yield i, {"image": digit_pool.encode_image(image, "jpg"), "label": int(label)}
