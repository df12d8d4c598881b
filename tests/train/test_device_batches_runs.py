"""`config.device_batches` in real runs: the host pipeline's training without augmentation,
and a resume after SIGKILL that is bit-identical (one or ten steps a call). Several devices and two processes:
tests/test_multihost.py (`jit,device_batches`)."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import run_python
import test_resume

SMOKE = ["-m", "experiments.main", "--config=configs/quickstart.py:smoke", "--config.progress=False"]


def _run(workdir, data_dir, *overrides):
  run_python(SMOKE + [f"--workdir={workdir}", f"--config.data_dir={data_dir}", *overrides])
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["runs"]


def test_without_augmentation_device_batches_train_as_the_host_pipeline(tmp_path, data_dir):
  # Same examples in the same order and the same preprocessing: the same training, up to
  # XLA's float rounding of a differently fused step.
  common = ["--config.suite=scratch", "--config.augment=False", "--config.num_steps=30"]
  host = _run(tmp_path / "host", data_dir, *common)
  device = _run(tmp_path / "device", data_dir, *common, "--config.device_batches=True")
  np.testing.assert_allclose(device["scratch"]["final_train_loss"],
                             host["scratch"]["final_train_loss"], rtol=1e-5)
  assert abs(device["scratch"]["eval_accuracy"] - host["scratch"]["eval_accuracy"]) <= 0.002
  params = [test_resume._final_state(str(tmp_path / w / "scratch"))["params"]  # pylint: disable=protected-access
            for w in ("host", "device")]
  close = jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6), *params)
  assert all(jax.tree.leaves(close))


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_call", [1, 10])
def test_device_batches_resume_after_sigkill_bit_identical(tmp_path, data_dir, monkeypatch,
                                                           steps_per_call):
  monkeypatch.setattr(test_resume, "ARGS", test_resume.ARGS + [
      "--config.device_batches=True", f"--config.steps_per_call={steps_per_call}"])
  reference = tmp_path / "uninterrupted"
  run_python(test_resume._args(reference, data_dir))  # pylint: disable=protected-access
  interrupted = tmp_path / "interrupted"
  process = test_resume._start(interrupted, data_dir)  # pylint: disable=protected-access
  point = test_resume.KILL_POINTS["student_after_first_checkpoint"]
  assert test_resume._wait_for(process, lambda: point(str(interrupted)))  # pylint: disable=protected-access
  process.kill()
  process.wait()
  run_python(test_resume._args(interrupted, data_dir))  # pylint: disable=protected-access
  test_resume._assert_identical_runs(str(interrupted), str(reference))  # pylint: disable=protected-access

