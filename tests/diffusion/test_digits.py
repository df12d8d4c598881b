"""The digits dataset helper: shapes, range, a stratified, repeatable, disjoint split."""

import numpy as np

from kdjax.diffusion import digits


def test_split_is_scaled_stratified_and_fixed():
  data = digits.load()
  assert data.train_images.shape == (1497, 8, 8, 1) and data.test_images.shape == (300, 8, 8, 1)
  assert data.train_images.dtype == np.float32 and data.train_labels.dtype == np.int32
  everything = np.concatenate([data.train_images, data.test_images])
  assert everything.min() == -1.0 and everything.max() == 1.0
  # The values are k / 8 − 1 for integers k in 0..16.
  np.testing.assert_array_equal((everything + 1) * 8, np.round((everything + 1) * 8))
  assert np.abs(np.bincount(data.test_labels) - 30).max() <= 1  # proportional to the classes
  np.testing.assert_allclose(np.sqrt(np.mean(everything ** 2)), digits.SIGMA_DATA, atol=0.005)
  again = digits.load()
  np.testing.assert_array_equal(again.test_images, data.test_images)
  # No held-out image is also a training image (the split is by index; the raw data has no
  # exact duplicates across it).
  train_rows = {row.tobytes() for row in data.train_images}
  assert not any(row.tobytes() in train_rows for row in data.test_images)
