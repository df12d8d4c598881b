"""benchmarks/gpu_benchmark.py runs where the GPU image's missing packages cannot be imported."""

import json

import pytest

from conftest import import_blocker, run_python

# The GPU machine's image lacks these (shared/ENVIRONMENT.md); importing one must fail there.
MISSING_ON_GPU = ("ml_collections", "grain", "tensorflow_datasets", "tensorboardX", "mnist1d",
                  "array_record")

_BLOCKER = import_blocker(MISSING_ON_GPU)


def test_imports_nothing_the_gpu_image_lacks():
  code = _BLOCKER + """
import benchmarks.gpu_benchmark as bench
bench.parse_args(["--smoke"])
from kdjax import losses, models  # What the figures import.
import kdjax.models.transformer, kdjax.losses.fused
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
print("LOADED", loaded)
""".format(blocked=MISSING_ON_GPU)
  result = run_python(["-c", code])
  assert "LOADED []" in result.stdout


def test_bad_arguments_exit_2_with_one_line():
  result = run_python(["-m", "benchmarks.gpu_benchmark", "--steps=-1"], check=False)
  assert result.returncode == 2
  assert result.stderr.strip() == "Error: --steps must be a positive integer, got -1."
  result = run_python(["-m", "benchmarks.gpu_benchmark", "--figures=kd_step,nope"], check=False)
  assert result.returncode == 2
  assert result.stderr.strip().startswith("Error: --figures: unknown nope; valid: kd_step,")
  result = run_python(["-m", "benchmarks.gpu_benchmark", "--fused_chunks=8192x0"], check=False)
  assert result.returncode == 2
  assert result.stderr.strip().startswith("Error: --fused_chunks must be VOCABxTOKENS pairs")
  assert "\n" not in result.stderr.strip()


@pytest.mark.slow
def test_smoke_prints_every_figure_as_json_without_the_missing_packages():
  code = _BLOCKER + """
sys.argv = ["gpu_benchmark", "--smoke"]
runpy.run_module("benchmarks.gpu_benchmark", run_name="__main__")
"""
  result = run_python(["-c", code], timeout=900)
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  figures = [r["figure"] for r in records]
  assert figures == ["start", "kd_step", "fused_loss", "lm_kd_step", "teacher_forward",
                     "kd_step", "kd_step"]
  resnet, fused, lm, teacher, vit, small_batch = records[1:]
  assert not any("error" in r for r in records), records
  for record in (resnet, vit):
    for name in ("kdjax", "kdjax_bf16", "kdjax_teacher_precomputed", "torch_eager",
                 "torch_eager_bf16"):
      assert record[f"{name}_examples_per_sec"] > 0, (record["student"], name)
    assert record["speedup_vs_torch_eager"] > 0
  assert (vit["student"], vit["teacher"], vit["depth"]) == ("vit_tiny", "vit_small", 1)
  assert "torch_compile_skipped" in resnet  # Smoke mode does not compile torch.
  assert small_batch["skipped"].startswith("smoke mode")
  assert lm["tokens_per_sec"] > 0
  assert fused["full_logits_temp_bytes"] > 0 and fused["fused_temp_bytes"] > 0
  assert min(fused["fused_ms"], fused["full_logits_ms"], fused["trl_torch_ms"]) > 0
  assert fused["fused_chunks"] == ["256x1024", "256x256"]  # smoke vocabulary: 256
  assert fused["fused_256x256_ms"] > 0 and fused["fused_256x256_temp_bytes"] > 0
  # Folding is exact up to float rounding; bfloat16 keeps the top-1 of these random inputs.
  assert teacher["folded_max_abs_logit_diff"] < 1e-3
  assert teacher["folded_top1_agreement"] == 1.0
  assert teacher["bfloat16_max_abs_logit_diff"] < 0.5
