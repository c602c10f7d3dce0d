"""``digits``: the 8x8 handwritten digits that ship inside scikit-learn, as a TFDS dataset.

It needs no network, so the demo and the tests can build it anywhere:
``tfds.builder("digits").download_and_prepare(file_format="array_record")`` (the input
pipeline does this on first use; ArrayRecord files let training resume without
re-reading). 1,797 grayscale images, 10 classes; a fixed stratified split holds out
360 images (20%) as ``test``. Pixels are scikit-learn's 0..16 counts scaled to 0..255.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360
SPLIT_SEED = 0


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
    from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    indices = np.arange(len(images))
    train, test = model_selection.train_test_split(
        indices, test_size=NUM_TEST, stratify=digits.target, random_state=SPLIT_SEED)
    return {
        "train": self._generate_examples(images, digits.target, np.sort(train)),
        "test": self._generate_examples(images, digits.target, np.sort(test)),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
