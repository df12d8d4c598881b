"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) == one process."""

import json
import os
import subprocess
import sys

import portpicker
import pytest

from conftest import REPO, run_python

ARGS = ["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
        "--config.suite=teacher,kd"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["jit", "pmap", "jit,device_batches",
                                      "jit,device_batches,steps_per_call=10"])
def test_two_processes_match_one_process(tmp_path, data_dir, parallel):
  # jit,device_batches: each process holds the training split on its devices and the step
  # makes the global batch (kdjax/data/device_batches.py); steps_per_call=10: ten such steps
  # a call.
  parallel, *extra = parallel.split(",")
  common = ARGS + [f"--config.data_dir={data_dir}", f"--config.parallel={parallel}",
                   *(["--config.device_batches=True"] if extra else []),
                   *[f"--config.{field}" for field in extra[1:]]]
  four_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  run_python(common + [f"--workdir={tmp_path / 'single'}"], env_extra=four_devices)

  port = portpicker.pick_unused_port()
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  processes = [
      subprocess.Popen(
          [sys.executable] + common + [f"--workdir={tmp_path / 'multi'}",
                                       f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]

  def runs(name):
    with open(tmp_path / name / "summary.json") as f:
      return json.load(f)["runs"]

  single, multi = runs("single"), runs("multi")
  for name in ("teacher", "kd"):
    assert abs(multi[name]["final_train_loss"] - single[name]["final_train_loss"]) <= \
        1e-3 * single[name]["final_train_loss"]
    assert abs(multi[name]["eval_accuracy"] - single[name]["eval_accuracy"]) <= 0.01
