"""scikit-learn's handwritten digits as a TFDS dataset, generated offline (array_record).

`sklearn.datasets.load_digits`: 1,797 greyscale 8x8 images of 10 classes, bundled with
scikit-learn (nothing is downloaded). The records hold the images already scaled to [−1, 1]
and split as `kdjax.diffusion.digits.load()` splits them (stratified, seed 0): 1,497 train,
300 held out ('test'), so the diffusion metrics' reference set is exactly the eval split.
Read back with `tfds.data_source` like every kdjax dataset.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """The 8x8 digits in [−1, 1], kdjax's fixed train / held-out split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "kdjax.diffusion.digits.load(): x / 8 − 1, 300 held out (seed 0)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's 8x8 handwritten digits (UCI optdigits test set) in [-1, 1].",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Scalar(dtype=np.int64),  # Position in digits.load()'s split.
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    from kdjax.diffusion import digits  # pylint: disable=g-import-not-at-top
    data = digits.load()
    return {"train": self._generate_examples(data.train_images, data.train_labels),
            "test": self._generate_examples(data.test_images, data.test_labels)}

  def _generate_examples(self, images, labels):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": np.asarray(image, np.float32), "label": int(label), "index": index}
