"""The benchmark entry points run and report what they promise (speed is not asserted)."""

import json

import pytest

from conftest import run_python


def test_benchmark_prints_one_json_line_with_the_fields():
  result = run_python(["-m", "experiments.benchmark", "--student=resnet8", "--teacher=resnet20",
                       "--num_classes=10", "--batch_size=4", "--steps=1", "--warmup=1"])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("examples_per_sec", "student_params", "teacher_params", "devices", "backend"):
    assert key in report
  assert report["examples_per_sec"] > 0 and report["devices"] == 1


def test_benchmark_on_eight_devices_with_pmap():
  result = run_python(["-m", "experiments.benchmark", "--student=resnet8", "--teacher=resnet8",
                       "--num_classes=10", "--batch_size=8", "--steps=1", "--warmup=1",
                       "--parallel=pmap", "--method=dkd"],
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert json.loads(result.stdout.strip().splitlines()[-1])["devices"] == 8


def test_torch_reference_matches_the_jax_models_and_reports_a_ratio():
  pytest.importorskip("torch", reason="the [torch] extra is not installed")
  from experiments import torch_reference
  assert torch_reference.param_count("resnet8x4", 100) == 1_233_540
  assert torch_reference.param_count("resnet32x4", 100) == 7_433_860
  result = run_python(["-m", "experiments.benchmark", "--student=resnet8", "--teacher=resnet8",
                       "--num_classes=10", "--batch_size=4", "--steps=1", "--warmup=1",
                       "--reference=torch"])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["speedup_vs_torch"] > 0 and report["torch_examples_per_sec"] > 0
