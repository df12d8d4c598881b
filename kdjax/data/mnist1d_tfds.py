"""MNIST-1D as a TFDS dataset, generated offline and stored as array_record.

MNIST-1D (Greydanus 2020, "Scaling down deep learning") is a procedurally generated 1-D
analogue of MNIST: 40-sample signals, 10 classes, 4000 train / 1000 test examples with the
`mnist1d` package's standard arguments. Nothing is downloaded: `_generate_examples` runs
the generator from the pip package, so `download_and_prepare()` works on an offline machine.

The records are read back with `tfds.data_source` (random access, no TensorFlow needed).
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
SIGNAL_LENGTH = 40


def _generate_arrays():
  # `mnist1d.data.get_dataset` downloads a pickle; `make_dataset` builds the same data locally.
  from mnist1d.data import get_dataset_args, make_dataset
  return make_dataset(get_dataset_args())


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D with the standard split of the `mnist1d` package (seed 42)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated with mnist1d.data.make_dataset(get_dataset_args())."}

  def _info(self) -> tfds.core.DatasetInfo:
    # Written out explicitly: dataset_info_from_configs needs a builder defined in a
    # dataset package directory, which this plain module is not.
    return tfds.core.DatasetInfo(
        builder=self,
        description="MNIST-1D (Greydanus 2020), generated offline by the mnist1d package.",
        features=tfds.features.FeaturesDict({
            "signal": tfds.features.Tensor(shape=(SIGNAL_LENGTH,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            # The generator's own order: records come back in hashed order, so the index
            # lets a test (or a user) compare with the arrays `mnist1d` returns.
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("signal", "label"),
        homepage="https://github.com/greydanus/mnist1d",
        citation="Greydanus, S. (2020). Scaling down deep learning. arXiv:2011.14439.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    arrays = _generate_arrays()
    return {
        "train": self._generate_examples(arrays["x"], arrays["y"]),
        "test": self._generate_examples(arrays["x_test"], arrays["y_test"]),
    }

  def _generate_examples(self, signals, labels):
    for index, (signal, label) in enumerate(zip(signals, labels)):
      yield index, {
          "signal": np.asarray(signal, np.float32),
          "label": int(label),
          "index": index,
      }
