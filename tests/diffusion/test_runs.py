"""Diffusion methods through the whole trunk (slow: each trains real runs in subprocesses):

  * the smoke quickstart end to end: exit 0, sample quality in summary.json beside the
    teacher's at the same NFE, the report's sample-quality table and figures;
  * 1 vs 8 forced host devices: the same losses for progressive, consistency and dmd;
  * SIGKILL inside a consistency and a dmd run, then the same command again: bit-identical
    final state, including consistency's EMA target and dmd's fake score network.
"""

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

SMOKE = ["-m", "experiments.main", "--config=configs/diffusion_quickstart.py:smoke"]


@pytest.mark.slow  # 3 min here (177 s): four runs, their sample quality and the teacher's.
def test_smoke_quickstart_writes_sample_quality_and_the_report(tmp_path):
  run_python(SMOKE + [f"--workdir={tmp_path}", f"--config.data_dir={tmp_path / 'data'}"],
             timeout=1200)
  with open(tmp_path / "summary.json") as f:
    runs = json.load(f)["runs"]
  assert set(runs) >= {"progressive_1", "progressive_2", "consistency", "dmd"}
  assert runs["consistency"]["sample_settings"] == "consistency1,consistency2"
  for name, nfe in (("progressive_1", 2), ("progressive_2", 1), ("consistency", 1),
                    ("consistency", 2), ("dmd", 1)):
    row = runs[name]
    for key in ("eval_fd", "eval_precision", "eval_recall", "eval_class_coverage",
                "eval_teacher_distance", "eval_teacher_fd"):
      assert np.isfinite(row[f"{key}_nfe{nfe}"]), (name, key, nfe)
    assert row["eval_teacher_full_nfe"] == 35 and row["eval_samples"] == 40
  assert runs["progressive_2"]["eval_nfe"] == 1 and runs["progressive_1"]["eval_nfe"] == 2
  report = (tmp_path / "results.md").read_text()
  assert "## Sample quality" in report and "| dmd | 1 |" in report
  assert (tmp_path / "diffusion_fd.png").stat().st_size > 0
  assert (tmp_path / "diffusion_samples.png").stat().st_size > 0


def _losses(workdir, devices):
  result = run_python(["tests/diffusion/multidevice_run.py", str(workdir),
                       "progressive,consistency,dmd"],
                      env_extra={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
                      timeout=1800)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 15 min on 2 busy cores (894 s beside a training run): 6 runs + their FD.
def test_diffusion_methods_give_the_single_device_losses_on_eight_devices(tmp_path):
  one, eight = _losses(tmp_path / "one", 1), _losses(tmp_path / "eight", 8)
  for method, losses in one.items():
    assert len(losses) == 3 and all(np.isfinite(losses)), (method, losses)
    np.testing.assert_allclose(eight[method], losses, rtol=2e-4, err_msg=method)


def _final_state(run_dir):
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = checkpointer.restore_raw(checkpointer.latest_step())
  checkpointer.close()
  return state


def _has_checkpoint(run_dir):
  directory = os.path.join(run_dir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


@pytest.mark.slow  # 6 min on 2 busy cores (363 s): a reference suite, two killed, the rerun.
def test_sigkill_then_rerun_is_bit_identical_with_ema_target_and_fake_score(tmp_path):
  args = SMOKE + ["--config.suite=consistency,dmd", "--config.num_steps=6",
                  "--config.checkpoint_every_steps=2", "--config.consistency.eval_samples=10",
                  "--config.dmd.eval_samples=10", f"--config.data_dir={tmp_path / 'data'}"]
  run_python(args + [f"--workdir={tmp_path / 'reference'}"], timeout=1200)
  workdir = tmp_path / "interrupted"
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  for run in ("consistency", "dmd"):  # Killed once inside each run, after a checkpoint.
    process = subprocess.Popen([sys.executable] + args + [f"--workdir={workdir}"], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not _has_checkpoint(str(workdir / run)) and process.poll() is None \
        and time.time() < deadline:
      time.sleep(0.01)
    assert process.poll() is None, f"{run} finished before it could be killed"
    process.kill()
    process.wait()
  run_python(args + [f"--workdir={workdir}"], timeout=1200)
  for run in ("consistency", "dmd"):
    got, want = (_final_state(str(workdir / run)),
                 _final_state(str(tmp_path / "reference" / run)))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want))), run
    with open(workdir / run / "run_summary.json") as f, \
        open(tmp_path / "reference" / run / "run_summary.json") as g:
      assert json.load(f)["eval_fd"] == json.load(g)["eval_fd"], run
  assert jax.tree.leaves(_final_state(str(workdir / "consistency"))["method_state"]["target"])
  assert jax.tree.leaves(_final_state(str(workdir / "dmd"))["params"]["method"]["fake"])
