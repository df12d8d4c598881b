"""The benchmark entry points run and report what they promise (speed is not asserted)."""

import importlib.util
import json
import re

import pytest

from conftest import run_python


def test_benchmark_prints_one_json_line_with_the_fields():
  result = run_python(["-m", "benchmarks.benchmark", "--student=resnet8", "--teacher=resnet20",
                       "--num_classes=10", "--batch_size=4", "--steps=1", "--warmup=1"])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("examples_per_sec", "student_params", "teacher_params", "devices", "backend"):
    assert key in report
  assert report["examples_per_sec"] > 0 and report["devices"] == 1
  progress = result.stderr.strip().splitlines()  # Phases on stderr; stdout is the JSON alone.
  assert progress[0].startswith("[benchmark 0s] building the kd step: resnet20 -> resnet8")
  assert re.search(r"\] round 1/1: kdjax [0-9.]+ ms a step \(ETA 0s\)$", progress[-1]), progress
  assert len(result.stdout.strip().splitlines()) == 1


@pytest.mark.slow  # A ResNet KD step compiled for 8 devices (~35 s here).
def test_benchmark_on_eight_devices_with_pmap():
  result = run_python(["-m", "benchmarks.benchmark", "--student=resnet8", "--teacher=resnet8",
                       "--num_classes=10", "--batch_size=8", "--steps=1", "--warmup=1",
                       "--parallel=pmap", "--method=dkd"],
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert json.loads(result.stdout.strip().splitlines()[-1])["devices"] == 8


@pytest.mark.slow  # Needs the [torch] extra, which CI installs before the slow tests.
def test_torch_reference_matches_the_jax_models_and_reports_a_ratio():
  if importlib.util.find_spec("torch") is None:  # A failure, not a skip: CI must run it.
    pytest.fail('needs the [torch] extra: pip install -e ".[torch]"')
  from benchmarks import torch_reference
  assert torch_reference.param_count("resnet8x4", 100) == 1_233_540
  assert torch_reference.param_count("resnet32x4", 100) == 7_433_860
  result = run_python(["-m", "benchmarks.benchmark", "--student=resnet8", "--teacher=resnet8",
                       "--num_classes=10", "--batch_size=4", "--steps=1", "--warmup=1",
                       "--reference=torch"])
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["speedup_vs_torch"] > 0 and report["torch_examples_per_sec"] > 0


def test_torch_reference_without_torch_fails_in_one_line_before_compiling():
  result = run_python(["-c", "import runpy, sys; sys.modules['torch'] = None; "
                       "sys.argv = ['benchmark', '--reference=torch']; "
                       "runpy.run_module('benchmarks.benchmark', run_name='__main__')"],
                      check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      'Error: --reference=torch needs PyTorch, which is not installed; install it with '
      '`pip install -e ".[torch]"` (a CPU wheel, torch==2.13.0) or drop --reference.']


def test_benchmark_help_exits_0_and_bad_names_are_one_line():
  assert "--reference" in run_python(["-m", "benchmarks.benchmark", "--help"]).stdout
  result = run_python(["-m", "benchmarks.benchmark", "--student=resnet8x5"], check=False)
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("Error: --student='resnet8x5' is not valid (did you mean 'resnet8x4'?);"
                         " valid values: cnn1d, "), line
