"""Language-model runs end to end (`configs/lm_quickstart.py:smoke`, offline pydoc corpus):
the suite and its metrics, 1 vs 8 devices, and resume after SIGKILL with on-policy samples and
DistiLLM's replay buffer in the state."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, run_python
from kdjax.train.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

SMOKE = ["-m", "experiments.main", "--config=configs/lm_quickstart.py:smoke"]
# gkd (student samples half the time) and distillm (replay buffer, fresh samples, data);
# no decoding metrics, so that the runs are only training.
ON_POLICY = SMOKE + ["--config.suite=teacher,gkd,distillm", "--config.lm.eval_prompts=0"]


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _final_state(run_dir):
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = checkpointer.restore_raw(checkpointer.latest_step())
  checkpointer.close()
  return state


@pytest.fixture(scope="module")
def lm_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("lm_tfds"))


@pytest.fixture(scope="module")
def on_policy_run(tmp_path_factory, lm_data_dir):
  workdir = str(tmp_path_factory.mktemp("on_policy"))
  run_python(ON_POLICY + [f"--workdir={workdir}", f"--config.data_dir={lm_data_dir}"])
  return workdir


def test_smoke_suite_reports_perplexity_agreement_and_acceptance(tmp_path, lm_data_dir):
  run_python(SMOKE + [f"--workdir={tmp_path}", f"--config.data_dir={lm_data_dir}"])
  runs = _summary(tmp_path)["runs"]
  assert set(runs) == {"teacher", "scratch", "kd", "fkl", "jsd", "gkd", "seq_kd", "adaspec",
                       "distillm", "miniplm"}
  for name, result in runs.items():
    assert np.isfinite(result["eval_perplexity"]) and result["eval_perplexity"] > 1, name
    np.testing.assert_allclose(result["eval_perplexity"], np.exp(result["eval_cross_entropy"]),
                               rtol=1e-6)
    if name not in ("teacher", "scratch", "miniplm"):
      assert 0 <= result["teacher_agreement"] <= 1, name
      for mode in ("greedy", "sampled"):
        assert 0 <= result[f"spec_{mode}_acceptance_rate"] <= 1, (name, mode)
        assert result[f"spec_{mode}_implied_speedup"] > 0, (name, mode)
  assert os.path.exists(tmp_path / "results.md")


def test_lm_runs_give_the_single_device_numbers_on_eight_devices(tmp_path, on_policy_run,
                                                                 lm_data_dir):
  run_python(ON_POLICY + [f"--workdir={tmp_path}", f"--config.data_dir={lm_data_dir}"],
             env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  one, eight = _summary(on_policy_run)["runs"], _summary(tmp_path)["runs"]
  for name in ("teacher", "gkd", "distillm"):
    for key in ("final_train_loss", "eval_cross_entropy", "eval_accuracy"):
      np.testing.assert_allclose(eight[name][key], one[name][key], rtol=2e-4,
                                 err_msg=f"{name} {key}")


def test_sigkill_during_on_policy_runs_then_rerun_is_bit_identical(tmp_path, on_policy_run,
                                                                  lm_data_dir):
  args = ON_POLICY + [f"--workdir={tmp_path}", f"--config.data_dir={lm_data_dir}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  process = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  checkpoints = tmp_path / "distillm" / "checkpoints"
  deadline = time.time() + 900
  while time.time() < deadline and process.poll() is None:
    if checkpoints.is_dir() and any(n.isdigit() for n in os.listdir(checkpoints)):
      break
    time.sleep(0.01)
  process.kill()
  process.wait()
  assert checkpoints.is_dir(), "never reached distillm's first checkpoint"
  run_python(args)
  for name in ("gkd", "distillm"):
    got, want = _final_state(tmp_path / name), _final_state(os.path.join(on_policy_run, name))
    same = jax.tree.map(np.array_equal, got, want)
    assert all(jax.tree.leaves(same)), f"{name}: state (replay buffer included) differs"
