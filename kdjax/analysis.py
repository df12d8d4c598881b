"""How a student relates to its teacher and to the labels, on held-out data: agreement,
fidelity, per-class accuracy and calibration.

Every function takes logits `[N, C]` (and labels `[N]` int) as numpy or jax arrays and
computes in float64 numpy, so the numbers do not depend on the device or on jit; `logits_of`
collects a model's logits over a dataset in batches.

- Agreement and fidelity follow Stanton et al., "Does Knowledge Distillation Really Work?"
  (NeurIPS 2021): top-1 agreement with the teacher, and the KL divergence from teacher to
  student predictive distributions.
- Calibration follows Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017):
  predictions are grouped by confidence (the top probability) into `num_bins` equal-width bins
  `(k/M, (k+1)/M]`; ECE = sum_k |B_k| / N * |accuracy(B_k) - confidence(B_k)|, 15 bins as there.

    >>> import numpy as np
    >>> logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4]]))
    >>> round(expected_calibration_error(logits, np.array([0, 1]), num_bins=2), 6)
    0.25
"""

from typing import Callable, NamedTuple, Optional

import numpy as np


def _logits(name: str, arg_name: str, x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 2:
    raise ValueError(f"{name}: {arg_name} must be logits of shape [N, C] with N >= 1 and "
                     f"C >= 2, got shape {x.shape}.")
  return x


def _labels(name: str, labels, logits: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != logits.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name}: labels must be integers of shape [N] = {logits.shape[:1]} "
                     f"(the logits are {logits.shape}), got {labels.dtype} {labels.shape}.")
  if labels.min() < 0 or labels.max() >= logits.shape[1]:
    raise ValueError(f"{name}: labels must lie in [0, {logits.shape[1]}), got values from "
                     f"{labels.min()} to {labels.max()}.")
  return labels


def _pair(name: str, student_logits, teacher_logits):
  student = _logits(name, "student_logits", student_logits)
  teacher = _logits(name, "teacher_logits", teacher_logits)
  if student.shape != teacher.shape:
    raise ValueError(f"{name}: student_logits {student.shape} and teacher_logits "
                     f"{teacher.shape} must have the same shape [N, C].")
  return student, teacher


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
  """Stable float64 log-softmax of `logits / temperature` over the last axis."""
  z = np.asarray(logits, dtype=np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def accuracy(logits, labels) -> float:
  """Top-1 accuracy: logits [N, C], labels [N] -> a fraction in [0, 1]."""
  logits = _logits("accuracy", "logits", logits)
  return float(np.mean(logits.argmax(-1) == _labels("accuracy", labels, logits)))


def agreement(student_logits, teacher_logits) -> float:
  """Top-1 agreement: the fraction of the N examples where student and teacher ([N, C] each)
  predict the same class, whatever the label (Stanton et al. 2021)."""
  student, teacher = _pair("agreement", student_logits, teacher_logits)
  return float(np.mean(student.argmax(-1) == teacher.argmax(-1)))


def fidelity_kl(student_logits, teacher_logits, *, temperature: float = 1.0) -> float:
  """Mean over the N examples of KL(p_t || p_s), p = softmax(logits / temperature) ([N, C]
  each); 0 for a student that reproduces the teacher's distribution (Stanton et al. 2021)."""
  if not temperature > 0:
    raise ValueError(f"fidelity_kl: temperature must be a positive number, got {temperature!r}.")
  student, teacher = _pair("fidelity_kl", student_logits, teacher_logits)
  log_p_t, log_p_s = log_softmax(teacher, temperature), log_softmax(student, temperature)
  return float(np.mean(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)))


def per_class_accuracy(logits, labels, num_classes: Optional[int] = None) -> np.ndarray:
  """Accuracy of the examples of each class: logits [N, C], labels [N] -> [num_classes]
  (default C), NaN for a class with no example."""
  logits = _logits("per_class_accuracy", "logits", logits)
  labels = _labels("per_class_accuracy", labels, logits)
  num_classes = logits.shape[1] if num_classes is None else num_classes
  if num_classes < logits.shape[1]:
    raise ValueError(f"per_class_accuracy: num_classes={num_classes} is smaller than the "
                     f"logits' {logits.shape[1]} classes.")
  correct = (logits.argmax(-1) == labels).astype(np.float64)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  hits = np.bincount(labels, weights=correct, minlength=num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, hits / counts, np.nan)


class ReliabilityBins(NamedTuple):
  """Predictions grouped by confidence into `M` equal-width bins `(k/M, (k+1)/M]`.

  edges: [M + 1], 0 to 1.
  counts: [M] examples per bin.
  accuracy: [M] fraction correct per bin (NaN for an empty bin).
  confidence: [M] mean top probability per bin (NaN for an empty bin).
  """
  edges: np.ndarray
  counts: np.ndarray
  accuracy: np.ndarray
  confidence: np.ndarray


def reliability_bins(logits, labels, *, num_bins: int = 15) -> ReliabilityBins:
  """The reliability diagram's bins (Guo et al. 2017): logits [N, C], labels [N]."""
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"reliability_bins: num_bins must be a positive integer, got {num_bins!r}.")
  logits = _logits("reliability_bins", "logits", logits)
  labels = _labels("reliability_bins", labels, logits)
  probabilities = np.exp(log_softmax(logits))
  confidence = probabilities.max(-1)
  correct = (probabilities.argmax(-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Bin k holds (edges[k], edges[k+1]]: the right-closed bins of Guo et al.'s code.
  index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
  counts = np.bincount(index, minlength=num_bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    bin_accuracy = np.bincount(index, weights=correct, minlength=num_bins) / counts
    bin_confidence = np.bincount(index, weights=confidence, minlength=num_bins) / counts
  return ReliabilityBins(edges, counts.astype(np.int64), bin_accuracy, bin_confidence)


def expected_calibration_error(logits, labels, *, num_bins: int = 15) -> float:
  """ECE = sum_k |B_k| / N * |accuracy(B_k) - confidence(B_k)| over `num_bins` equal-width
  confidence bins (Guo et al. 2017; 15 bins there). logits [N, C], labels [N]."""
  bins = reliability_bins(logits, labels, num_bins=num_bins)
  filled = bins.counts > 0
  gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
  return float(np.sum(bins.counts[filled] / bins.counts.sum() * gaps))


def plot_reliability(ax, bins: ReliabilityBins, *, label: str = "", color=None):
  """Draws a reliability diagram on a matplotlib Axes: per-bin accuracy as bars against the
  diagonal of perfect calibration; the bars' gap to the diagonal is the miscalibration."""
  centers = (bins.edges[:-1] + bins.edges[1:]) / 2
  width = bins.edges[1] - bins.edges[0]
  filled = bins.counts > 0
  ax.bar(centers[filled], bins.accuracy[filled], width=width, alpha=0.5, edgecolor="k",
         label=label, color=color)
  ax.plot([0, 1], [0, 1], "k--", linewidth=1)
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")


def logits_of(apply_fn: Callable, variables, inputs, *, batch_size: int = 500) -> np.ndarray:
  """The logits [N, C] of `apply_fn(variables, x, train=False)` (a kdjax apply function,
  returning `(Output, state)`) over `inputs` [N, ...], in batches of `batch_size`, jitted."""
  import jax  # pylint: disable=g-import-not-at-top  (the rest of the module is numpy only)
  inputs = np.asarray(inputs)
  if inputs.ndim < 1 or inputs.shape[0] == 0:
    raise ValueError(f"logits_of: inputs must be a batch [N, ...] with N >= 1, got shape "
                     f"{inputs.shape}.")
  forward = jax.jit(lambda v, x: apply_fn(v, x, train=False)[0].logits)
  return np.concatenate([np.asarray(forward(variables, inputs[i:i + batch_size]))
                         for i in range(0, inputs.shape[0], batch_size)])
