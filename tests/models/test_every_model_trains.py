"""Every model of the zoo takes one real KD train step (student of a small teacher of its input
kind) with a finite loss and updated parameters. Slow: one compile per model."""

import math

import pytest

from kdjax import models

TEACHER_FOR_KIND = {"image32": "resnet8", "image224": "resnet18", "signal1d": "mlp"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in models.MODELS  # LMs: test_transformer_lm.py
                                     if models.registry.model_input_kind(n) != "tokens"))
def test_every_model_takes_a_kd_step(name):
  from experiments.synthetic_step import build_synthetic_step
  kind = models.registry.model_input_kind(name)
  step = build_synthetic_step(name, TEACHER_FOR_KIND[kind], num_classes=10, batch_size=2,
                              method_name="kd")
  step.run(1)
  metrics = step.last_metrics()
  assert math.isfinite(metrics["loss"]) and metrics["kd"] > 0 and metrics["grad_norm"] > 0
