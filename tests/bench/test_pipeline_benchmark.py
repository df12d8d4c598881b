"""benchmarks/pipeline_benchmark.py: its JSON figures, with the packages the GPU image lacks
blocked except the wheels carried there (ml-collections, grain, array_record)."""

import json

from conftest import import_blocker, run_python

# On the GPU machine these stay missing even with the carried wheels.
MISSING_ON_GPU = ("tensorflow_datasets", "tensorboardX", "mnist1d")

_BLOCKED_RUN = import_blocker(MISSING_ON_GPU) + """
sys.argv = ["pipeline_benchmark"] + sys.argv[1:]
runpy.run_module("benchmarks.pipeline_benchmark", run_name="__main__")
"""


def test_quickstart_loop_on_synthetic_signals_without_tfds_or_mnist1d():
  result = run_python(["-c", _BLOCKED_RUN, "--loops=quickstart", "--synthetic_mnist1d",
                       "--quick", "--rounds=1"])
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [r["figure"] for r in records] == ["machine", "pipeline_alone", "pipeline_alone",
                                            "loop_vs_step"]
  loop = records[-1]
  assert loop["run"] == "quickstart mlp <- cnn1d (synthetic signals)"
  for key in ("step_only_examples_per_sec", "loop_examples_per_sec_device_batches",
              "step_distinct_batches_examples_per_sec", "device_step_fixed_refs_examples_per_sec",
              "loop_examples_per_sec_device_batches_per_call",
              "device_steps_per_call_fixed_refs_examples_per_sec"):
    assert loop[key] > 0, key
  assert loop["steps_per_call"] == 5  # --quick's 5 loop steps: 10 rounded down to a divisor.
  assert loop["goal"] == 0.95 and loop["prefetch_workers"] == 1


def test_bad_loop_name_is_one_line():
  result = run_python(["-m", "benchmarks.pipeline_benchmark", "--loops=quickstart,nope"],
                      check=False)
  assert result.returncode != 0
  assert result.stderr.strip() == "Error: --loops: unknown nope; valid: quickstart, resnet8x4."


def test_bad_steps_per_call_is_one_line():
  result = run_python(["-m", "benchmarks.pipeline_benchmark", "--steps_per_call=0"],
                      check=False)
  assert result.returncode != 0
  assert result.stderr.strip() == "Error: --steps_per_call must be a positive integer, got 0."
