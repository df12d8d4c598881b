"""Fréchet distance against scipy's matrix square root; precision/recall on hand-made clouds."""

import numpy as np
import pytest
import scipy.linalg

from kdjax.diffusion import metrics


def test_frechet_distance_matches_scipy_reference():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  b = 0.5 + rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  reference = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
               - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
  assert metrics.frechet_distance(a, b) == pytest.approx(reference, rel=1e-10)
  assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_known_gaussians():
  """Diagonal covariances: d² = |Δμ|² + Σ (σ_a − σ_b)², computed by hand."""
  mean_a, mean_b = np.array([0.0, 1.0]), np.array([3.0, 1.0])
  cov_a, cov_b = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
  d2 = metrics.frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
  assert d2 == pytest.approx(9.0 + (2 - 1) ** 2 + (1 - 3) ** 2)


def test_frechet_distance_with_singular_covariances_is_finite():
  rng = np.random.default_rng(1)
  a = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 5))], axis=1)
  b = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 5))], axis=1)
  assert np.isfinite(metrics.frechet_distance(a, b))


def test_precision_recall_on_point_clouds():
  rng = np.random.default_rng(0)
  cloud = rng.normal(size=(200, 4))
  assert metrics.precision_recall(cloud, cloud) == {"precision": 1.0, "recall": 1.0}
  far = cloud + 100.0
  assert metrics.precision_recall(cloud, far) == {"precision": 0.0, "recall": 0.0}
  # A generator that covers only half the real cloud (mode dropping): full precision, about
  # half the recall.
  half = cloud[cloud[:, 0] > 0]
  result = metrics.precision_recall(cloud, half)
  assert result["precision"] == 1.0
  assert 0.4 < result["recall"] < 0.75, result


def test_precision_recall_uses_kth_neighbour_radius():
  """1-D points 0, 1, 2, 3 (k = 1: radius 1 each): 3.9 is inside (3's ball), 4.1 is not."""
  real = np.array([[0.0], [1.0], [2.0], [3.0]])
  fake = np.array([[3.9], [4.1], [-0.5], [10.0]])
  assert metrics.precision_recall(real, fake, k=1)["precision"] == 0.5


def test_class_coverage():
  assert metrics.class_coverage([0, 1, 2, 2], 4) == 0.75
  assert metrics.class_coverage([0] * 97 + [1, 2, 3], 4, min_fraction=0.05) == 0.25
  np.testing.assert_array_equal(metrics.class_histogram([1, 1, 3], 4), [0, 2, 0, 1])
  with pytest.raises(ValueError, match=r"predicted labels must be in \[0, 4\)"):
    metrics.class_histogram([4], 4)
