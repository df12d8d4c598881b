"""scikit-learn's handwritten digits as a small image dataset for diffusion (no download).

`sklearn.datasets.load_digits`: 1,797 greyscale 8x8 images of 10 classes, integer values 0..16,
bundled with scikit-learn (the UCI "Optical Recognition of Handwritten Digits" test set).
`load()` scales them to [−1, 1] (x / 8 − 1) and splits them once, stratified by class and
seeded, into 1,497 train and 300 held-out images: the held-out set is what sample quality
(Fréchet distance, precision/recall) is measured against.
"""

from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NUM_TEST = 300
SPLIT_SEED = 0
# The root mean square of the scaled pixels, sqrt(E[x²]) = 0.8498 over all 1,797 images: EDM's
# σ_data for this data (its preconditioning assumes E[x²] = σ_data²; edm.py).
SIGMA_DATA = 0.85


class Digits(NamedTuple):
  """The split: images float32 [N, 8, 8, 1] in [−1, 1], labels int32 [N]."""
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def load(num_test: int = NUM_TEST, seed: int = SPLIT_SEED) -> Digits:
  """The digits, scaled to [−1, 1], split into train and held-out (stratified by class).

  Args:
    num_test: the held-out size (300 by default: 29 to 31 per class).
    seed: the split's seed; the default split is the one reported numbers use.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  if not 0 < num_test < len(digits.target):
    raise ValueError(f"digits.load: num_test must be in (0, {len(digits.target)}), got {num_test}.")
  images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      images, labels, test_size=num_test, stratify=labels, random_state=seed)
  return Digits(train_x, train_y, test_x, test_y)
