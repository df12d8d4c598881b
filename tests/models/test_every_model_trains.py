"""One model of each family of the zoo takes one real KD train step (student of a small teacher
of its input kind) with a finite loss and updated parameters. Slow: one compile per model.

The other members of a family differ only in depth and width (resnet20/32/44/56/110 are
resnet8's blocks repeated, wrn_40_2 is wrn_16_1 deeper and wider, ...): every model's
variables and outputs are checked with `jax.eval_shape` in tests/test_models.py (default
suite), so a real compile per variant (10-60 s each here) would add time and no coverage."""

import math

import pytest

from kdjax import models

TEACHER_FOR_KIND = {"image32": "resnet8", "image224": "resnet18", "signal1d": "mlp"}
# One per family (module file and block type); LMs are in test_transformer_lm.py.
REPRESENTATIVES = ("cnn1d", "mlp", "resnet8x4", "resnet18", "wrn_16_1", "vgg8", "mobilenetv1",
                   "mobilenetv2", "shufflenetv1", "shufflenetv2", "vit_tiny")


def test_representatives_cover_every_family():
  modules = lambda names: {type(models.get_model(n, num_classes=10)).__module__ for n in names}
  # Not the LMs, nor the diffusion denoisers (dict inputs; tests/diffusion/test_unet.py).
  non_lm = [n for n in models.MODELS
            if models.registry.model_input_kind(n) not in ("tokens", "image8")]
  assert modules(REPRESENTATIVES) == modules(non_lm)
  assert {models.registry.model_input_kind(n) for n in REPRESENTATIVES} == set(TEACHER_FOR_KIND)


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_every_model_family_takes_a_kd_step(name):
  from benchmarks.synthetic_step import build_synthetic_step
  kind = models.registry.model_input_kind(name)
  step = build_synthetic_step(name, TEACHER_FOR_KIND[kind], num_classes=10, batch_size=2,
                              method_name="kd")
  step.run(1)
  metrics = step.last_metrics()
  assert math.isfinite(metrics["loss"]) and metrics["kd"] > 0 and metrics["grad_norm"] > 0
