"""kdjax.analysis against hand computations."""

import math

import numpy as np
import pytest

from kdjax import analysis


def _logits_of_probabilities(probabilities):
  return np.log(np.asarray(probabilities, dtype=np.float64))


def test_ece_and_bins_by_hand():
  # Confidences 0.9 (right), 0.6 (wrong), 0.55 (right), 0.95 (wrong); two bins (0, .5], (.5, 1]
  # hold nothing and all four: accuracy 2/4, confidence 3/4 -> ECE 0.25.
  logits = _logits_of_probabilities([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.95, 0.05]])
  labels = np.array([0, 1, 1, 1])
  bins = analysis.reliability_bins(logits, labels, num_bins=2)
  np.testing.assert_array_equal(bins.counts, [0, 4])
  assert math.isnan(bins.accuracy[0]) and math.isnan(bins.confidence[0])
  assert bins.accuracy[1] == pytest.approx(0.5)
  assert bins.confidence[1] == pytest.approx(0.75)
  assert analysis.expected_calibration_error(logits, labels, num_bins=2) == pytest.approx(0.25)
  # Ten bins: 0.9 -> (0.8, 0.9] (right-closed), 0.6 -> (0.5, 0.6], 0.55 -> (0.5, 0.6],
  # 0.95 -> (0.9, 1.0]. Bin (0.5, 0.6]: acc 1/2, conf 0.575; (0.8, 0.9]: 1 vs 0.9;
  # (0.9, 1]: 0 vs 0.95. ECE = (2 * 0.075 + 0.1 + 0.95) / 4 = 0.3.
  bins = analysis.reliability_bins(logits, labels, num_bins=10)
  np.testing.assert_array_equal(bins.counts, [0, 0, 0, 0, 0, 2, 0, 0, 1, 1])
  assert bins.confidence[5] == pytest.approx(0.575)
  assert analysis.expected_calibration_error(logits, labels, num_bins=10) == pytest.approx(0.3)


def test_ece_matches_a_loop_over_guo_et_al_bins():
  rng = np.random.default_rng(0)
  logits = 3 * rng.normal(size=(500, 10))
  labels = rng.integers(0, 10, size=500)
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  confidence, prediction = probabilities.max(-1), probabilities.argmax(-1)
  expected = 0.0
  for k in range(15):  # Guo et al.'s code: in_bin = lower < conf <= upper.
    in_bin = (confidence > k / 15) & (confidence <= (k + 1) / 15)
    if in_bin.any():
      expected += in_bin.mean() * abs((prediction[in_bin] == labels[in_bin]).mean()
                                      - confidence[in_bin].mean())
  assert analysis.expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-12)
  assert analysis.reliability_bins(logits, labels).counts.sum() == 500


def test_agreement_fidelity_accuracy_per_class():
  student = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
  teacher = np.array([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
  labels = np.array([0, 1, 2, 1])
  assert analysis.agreement(student, teacher) == 0.5
  assert analysis.accuracy(student, labels) == 0.75
  np.testing.assert_allclose(analysis.per_class_accuracy(student, labels), [1.0, 0.5, 1.0])
  per_class = analysis.per_class_accuracy(student, labels, num_classes=4)
  assert math.isnan(per_class[3])
  # KL(p_t || p_s) row by row, written out.
  p_t = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  p_s = np.exp(student) / np.exp(student).sum(-1, keepdims=True)
  expected = np.mean([sum(p_t[i, c] * math.log(p_t[i, c] / p_s[i, c]) for c in range(3))
                      for i in range(4)])
  assert analysis.fidelity_kl(student, teacher) == pytest.approx(expected, rel=1e-12)
  assert analysis.fidelity_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-15)
  # Temperature 2: the same formula on logits / 2.
  p_t2 = np.exp(teacher / 2) / np.exp(teacher / 2).sum(-1, keepdims=True)
  p_s2 = np.exp(student / 2) / np.exp(student / 2).sum(-1, keepdims=True)
  assert analysis.fidelity_kl(student, teacher, temperature=2.0) == pytest.approx(
      np.mean(np.sum(p_t2 * np.log(p_t2 / p_s2), -1)), rel=1e-12)


def test_fidelity_is_stable_for_large_logits():
  student = np.array([[1000.0, 0.0]])
  teacher = np.array([[0.0, 1000.0]])
  assert analysis.fidelity_kl(student, teacher) == pytest.approx(1000.0)


def test_logits_of_batches_an_apply_function():
  weights = np.arange(6.0).reshape(3, 2)

  def apply(variables, inputs, *, train, rng=None):
    del train, rng
    return type("Output", (), {"logits": inputs @ variables})(), {}

  inputs = np.arange(21.0).reshape(7, 3)
  np.testing.assert_allclose(analysis.logits_of(apply, weights, inputs, batch_size=3),
                             inputs @ weights, rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: analysis.expected_calibration_error(np.zeros((3,)), np.zeros(3, int)),
     r"logits must be logits of shape \[N, C\]"),
    (lambda: analysis.reliability_bins(np.zeros((3, 2)), np.zeros(4, int)),
     r"labels must be integers of shape \[N\] = \(3,\)"),
    (lambda: analysis.per_class_accuracy(np.zeros((2, 2)), np.array([0, 2])),
     r"labels must lie in \[0, 2\)"),
    (lambda: analysis.reliability_bins(np.zeros((2, 2)), np.zeros(2, int), num_bins=0),
     "num_bins must be a positive integer"),
    (lambda: analysis.agreement(np.zeros((2, 3)), np.zeros((2, 4))),
     r"student_logits \(2, 3\) and teacher_logits \(2, 4\)"),
    (lambda: analysis.fidelity_kl(np.zeros((2, 3)), np.zeros((2, 3)), temperature=0),
     "temperature must be a positive number"),
])
def test_bad_inputs_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()
