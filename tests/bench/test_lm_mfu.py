"""benchmarks/lm_mfu.py --smoke: the kdjax and PyTorch LM KD steps both run at tiny shapes, and
the analytic FLOP count matches a hand count."""

import pytest

from benchmarks import lm_mfu


def test_flops_by_hand():
  shape = lm_mfu.Shape(hidden=8, layers=2, heads=2, kv_heads=1, mlp=16)
  # Per layer: q and o 8x8 each, k and v 8x4 each (one KV head of width 4), MLP 3 x 8x16;
  # plus the unembedding 8 x 10.
  assert lm_mfu.matmul_params(shape, 10) == 2 * (64 + 64 + 32 + 32 + 384) + 80
  sizes = lm_mfu.Sizes(vocab=10, length=4, batch=1, teacher=shape, student=shape)
  flops = lm_mfu.flops_per_token(sizes)
  assert flops["student_train"] == 6 * 1232 + 12 * 2 * 8 * 4
  assert flops["teacher_forward"] == 2 * 1232 + 4 * 2 * 8 * 4


def test_full_shapes_are_the_stated_sizes():
  assert round(lm_mfu.matmul_params(lm_mfu.FULL.teacher, 128256) / 1e9, 2) == 1.24
  assert round(lm_mfu.matmul_params(lm_mfu.FULL.student, 128256) / 1e6) == 161


@pytest.mark.slow
def test_smoke_runs_both_frameworks():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  results = lm_mfu.main(["--smoke"])
  for name in ("jax", "torch"):
    assert "error" not in results[name], results[name]
    assert results[name]["step_s"] > 0 and results[name]["tokens_per_s"] > 0
