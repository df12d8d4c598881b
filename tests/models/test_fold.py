"""Tests for kdjax.models.fold: BatchNorm folded into convs of eval teachers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from kdjax.models import get_model
from kdjax.models.fold import fold_batch_norm


def _teacher(name, batch=2):
  """A model with non-trivial BatchNorm statistics and affine parameters: each variable moved
  by 0.2 |N(0, 1)| from its init value, drawn with numpy (conftest.random_variables; flax's
  initializers, op by op, took ~20 s of this test's 26 s here)."""
  module = get_model(name, num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)), jnp.float32)
  variables = random_variables(lambda: module.init(jax.random.key(1), x, train=False), seed=2,
                               jitter=0.2)
  return module, variables, x


@pytest.mark.parametrize("name", [
    "resnet8x4", pytest.param("wrn_16_2", marks=pytest.mark.slow),
    pytest.param("vgg8", marks=pytest.mark.slow),
    pytest.param("resnet32x4", marks=pytest.mark.slow)])
def test_folded_equals_eval_mode(name):
  module, variables, x = _teacher(name)
  want = module.apply(variables, x, train=False)
  apply, folded = fold_batch_norm(module, variables, x)
  assert "batch_stats" not in folded
  got, state = jax.jit(apply)(folded, x)
  assert state == {}
  scale = np.abs(want.logits).max()
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5,
                             atol=1e-5 * scale)
  np.testing.assert_array_equal(got.logits.argmax(-1), want.logits.argmax(-1))
  np.testing.assert_allclose(got.features["embedding"],
                             want.features["embedding"], rtol=1e-5,
                             atol=1e-5 * np.abs(want.features["embedding"]).max())


@pytest.mark.slow
def test_bfloat16_teacher_close_and_eval_only():
  module, variables, x = _teacher("resnet8x4")
  want = module.apply(variables, x, train=False)
  apply, folded = fold_batch_norm(module, variables, x, dtype=jnp.bfloat16)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(folded))
  got, _ = jax.jit(apply)(folded, x)
  assert got.logits.dtype == jnp.float32
  np.testing.assert_allclose(got.logits, want.logits, rtol=0.1,
                             atol=0.05 * np.abs(want.logits).max())
  with pytest.raises(ValueError, match="eval-only"):
    apply(folded, x, train=True)
