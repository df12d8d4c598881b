"""Sample-quality metrics on feature vectors, in numpy / scipy float64 (host-side, after sampling).

The features are a domain classifier's embeddings (`classifier.py`): the FID recipe (Heusel et
al. 2017) with a classifier trained on the same data in place of Inception, which cannot be
downloaded here. Absolute values are therefore comparable only within one classifier.
"""

from typing import Dict, Tuple

import numpy as np
import scipy.linalg


def _features(name: str, features) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"{name} must be [N, D] features with N >= 2, got shape {features.shape}.")
  return features


def gaussian_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of [N, D] features, float64, unbiased covariance (N − 1)."""
  features = _features("features", features)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, *, eps: float = 1e-6) -> float:
  """d² = ||μ_a − μ_b||² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Fréchet distance of two Gaussians;
  Dowson & Landau 1982; FID, Heusel et al. 2017).

  (Σ_a Σ_b)^½ is scipy's `sqrtm`. As in the reference FID code: when the product is singular
  enough that the root comes out non-finite, both covariances get `eps`·I added; the root of a
  product of PSD matrices is real in exact arithmetic, so an imaginary part larger than rounding
  (> 1e-3 on the diagonal) is an error and a small one is dropped.
  """
  mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
  cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
  if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape:
    raise ValueError(f"frechet_distance: statistics of different dimensions: means "
                     f"{mean_a.shape} vs {mean_b.shape}, covariances {cov_a.shape} vs {cov_b.shape}.")
  root = scipy.linalg.sqrtm(cov_a @ cov_b)
  if not np.isfinite(root).all():
    offset = eps * np.eye(cov_a.shape[0])
    root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
  if np.iscomplexobj(root):
    largest = np.max(np.abs(np.diagonal(root).imag))
    if largest > 1e-3:
      raise ValueError(f"frechet_distance: sqrtm(cov_a @ cov_b) has an imaginary diagonal of "
                       f"{largest:.3g}; the covariances are not positive semi-definite.")
    root = root.real
  diff = mean_a - mean_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


def frechet_distance(features_a, features_b) -> float:
  """The Fréchet distance between Gaussians fitted to two feature sets, [N_a, D] and [N_b, D]."""
  return frechet_distance_from_statistics(*gaussian_statistics(features_a),
                                          *gaussian_statistics(features_b))


def _pairwise_distances(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Euclidean distances [N_a, N_b], float64, in row chunks (exact: difference, not the
  |a|² − 2ab + |b|² expansion, whose cancellation puts a point off its own ball)."""
  out = np.empty((a.shape[0], b.shape[0]))
  for start in range(0, a.shape[0], chunk):
    diff = a[start:start + chunk, None, :] - b[None, :, :]
    out[start:start + chunk] = np.sqrt(np.sum(diff * diff, axis=-1))
  return out


def _knn_radii(features: np.ndarray, k: int) -> np.ndarray:
  """Distance from each point to its k-th nearest other point (the point itself is 0th)."""
  distances = _pairwise_distances(features, features)
  return np.partition(distances, k, axis=1)[:, k]


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
  """Fraction of queries inside at least one ball B(manifold_i, radii_i)."""
  inside = _pairwise_distances(queries, manifold) <= radii[None, :]
  return float(np.mean(np.any(inside, axis=1)))


def precision_recall(real_features, fake_features, *, k: int = 3) -> Dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991).

  Each set's manifold is the union of balls around its points with radius the distance to the
  k-th nearest neighbour in the set (k = 3, the paper's default). Precision: the fraction of
  generated samples inside the real manifold (quality); recall: the fraction of real samples
  inside the generated manifold (diversity).

  Args:
    real_features: [N_r, D]; fake_features: [N_f, D]; both sets need more than k points.
  Returns:
    {'precision': float, 'recall': float}, each in [0, 1].
  """
  real = _features("real_features", real_features)
  fake = _features("fake_features", fake_features)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall: real features have D={real.shape[1]}, fake D={fake.shape[1]}.")
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(f"precision_recall: each set needs more than k={k} points, got "
                     f"{real.shape[0]} real and {fake.shape[0]} fake.")
  return {"precision": _coverage(real, _knn_radii(real, k), fake),
          "recall": _coverage(fake, _knn_radii(fake, k), real)}


def class_histogram(predicted_labels, num_classes: int) -> np.ndarray:
  """How many samples a classifier assigns to each class, [num_classes] int."""
  predicted = np.asarray(predicted_labels).reshape(-1)
  if predicted.size and (predicted.min() < 0 or predicted.max() >= num_classes):
    raise ValueError(f"class_histogram: predicted labels must be in [0, {num_classes}), got "
                     f"[{predicted.min()}, {predicted.max()}].")
  return np.bincount(predicted, minlength=num_classes)


def class_coverage(predicted_labels, num_classes: int, *, min_fraction: float = 0.0) -> float:
  """The fraction of classes that receive more than `min_fraction` of the samples, by a
  classifier's predictions (1.0: every class is generated; a mode-collapsed generator scores
  low). With min_fraction = 0 a class counts once it has one sample."""
  counts = class_histogram(predicted_labels, num_classes)
  return float(np.mean(counts > min_fraction * max(counts.sum(), 1)))
