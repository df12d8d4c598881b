"""Self-distillation runs through the real launcher: 1 device vs 8 (jit, pmap), kill/resume.

PS-KD's per-example history and the EMA teacher are method state written inside the jitted
step from the global batch; these runs show that they give one device's numbers on 8 forced
host devices and that a SIGKILL and rerun resumes them bit-identically.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, run_python
from test_resume import _final_state, _steps, _wait_for

pytestmark = pytest.mark.slow

SMOKE = ["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
         # The quickstart's 4000 examples at batch 128: a new epoch every ~32 steps, so the
         # 40 smoke steps train on stored predictions from step 32 on.
         "--config.ps_kd.steps_per_epoch=32"]
RUNS = ["teacher", "ps_kd", "tf_kd", "tf_kd_reversed", "ema_teacher"]


def _args(workdir, data_dir, num_steps=40, suite=RUNS):
  return SMOKE + [f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                  f"--config.num_steps={num_steps}", f"--config.ps_kd.num_steps={num_steps}",
                  f"--config.ema_teacher.num_steps={num_steps}",
                  f"--config.suite={','.join(suite)}"]


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["runs"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("self_distillation_1dev"))
  run_python(_args(workdir, data_dir))
  return workdir


def test_self_distillation_runs_write_their_state(reference_run):
  runs = _summary(reference_run)
  assert list(runs) == RUNS
  history = _final_state(os.path.join(reference_run, "ps_kd"))["method_state"]
  assert np.asarray(history["seen"]).sum() > 3000  # Most of the 4000 examples were stored.
  np.testing.assert_allclose(np.asarray(history["history"])[np.asarray(history["seen"])]
                             .sum(-1), 1.0, rtol=1e-5)
  ema = _final_state(os.path.join(reference_run, "ema_teacher"))
  assert "teacher_agreement" in runs["ema_teacher"]
  moved = jax.tree.map(lambda t, s: not np.array_equal(t, s), ema["method_state"]["teacher"],
                       {"params": ema["params"]["student"], **ema.get("model_state", {})})
  assert all(jax.tree.leaves(moved))  # The EMA lags behind the student.


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_eight_devices_give_the_single_device_numbers(reference_run, tmp_path, data_dir,
                                                      parallel):
  reference = _summary(reference_run)
  run_python(_args(tmp_path, data_dir) + [f"--config.parallel={parallel}"],
             env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  runs = _summary(str(tmp_path))
  for name, run in runs.items():
    expected = reference[name]
    assert abs(run["final_train_loss"] - expected["final_train_loss"]) <= \
        1e-3 * abs(expected["final_train_loss"]), (name, run, expected)
    assert abs(run["eval_accuracy"] - expected["eval_accuracy"]) <= 0.01, (name, run, expected)
  history = _final_state(os.path.join(str(tmp_path), "ps_kd"))["method_state"]
  want = _final_state(os.path.join(reference_run, "ps_kd"))["method_state"]
  np.testing.assert_array_equal(history["seen"], want["seen"])
  np.testing.assert_allclose(history["history"], want["history"], atol=2e-3)


def test_sigkill_then_rerun_resumes_history_and_ema_teacher_bit_identically(tmp_path,
                                                                            data_dir):
  suite = ["ps_kd", "ema_teacher"]  # No teacher checkpoint needed.
  run_python(_args(tmp_path / "reference", data_dir, num_steps=60, suite=suite))
  workdir = tmp_path / "interrupted"
  args = _args(workdir, data_dir, num_steps=60, suite=suite)
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  for run in suite:  # Kill once inside each run, after its first checkpoint (step 20).
    process = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(process, lambda: _steps(str(workdir / run)) != [])
    process.kill()
    process.wait()
  run_python(args)
  for run in suite:
    got = _final_state(str(workdir / run))
    want = _final_state(str(tmp_path / "reference" / run))
    assert got["method_state"], run
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want))), run
