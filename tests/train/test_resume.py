"""Kill / preempt / damage a run and rerun the same command: the result is bit-identical."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, SMOKE, copy_runs, run_python
from kdjax.train.checkpoint import Checkpointer

# Teacher 60 steps, kd 40, a checkpoint every 20: the runs of conftest.smoke_suite.
ARGS = SMOKE + ["--config.suite=teacher,kd"]


def _args(workdir, data_dir):
  return ARGS + [f"--workdir={workdir}", f"--config.data_dir={data_dir}"]


def _final_state(run_dir):
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = checkpointer.restore_raw(checkpointer.latest_step())
  checkpointer.close()
  return state


def _assert_identical_runs(workdir, reference):
  for run in ("teacher", "kd"):
    with open(os.path.join(workdir, run, "run_summary.json")) as f:
      got = json.load(f)
    with open(os.path.join(reference, run, "run_summary.json")) as f:
      want = json.load(f)
    for key in ("eval_accuracy", "final_train_loss", "steps", "teacher_agreement"):
      assert got.get(key) == want.get(key), (run, key, got.get(key), want.get(key))
    with open(os.path.join(workdir, run, "metrics.jsonl")) as f:
      logged = [(line["split"], line["step"]) for line in map(json.loads, f)]
    assert len(logged) == len(set(logged)), f"{run}: metrics.jsonl repeats lines after resume"
    same = jax.tree.map(np.array_equal, _final_state(os.path.join(workdir, run)),
                        _final_state(os.path.join(reference, run)))
    assert all(jax.tree.leaves(same)), f"{run}: parameters differ after resume"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smoke_suite):
  """`ARGS` run uninterrupted: its teacher and kd runs, copied from the session's smoke
  quickstart (the same runs: neither the suite nor the data_dir changes a run)."""
  return copy_runs(smoke_suite[0], tmp_path_factory.mktemp("uninterrupted"), ["teacher", "kd"])


def _start(workdir, data_dir):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable] + _args(workdir, data_dir), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(process, condition, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if process.poll() is not None:
      return False
    time.sleep(0.01)
  return False


def _steps(run_dir):
  directory = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


KILL_POINTS = {
    # The teacher's first checkpoint is complete; the teacher is still training.
    "teacher_after_first_checkpoint": lambda w: _steps(os.path.join(w, "teacher")) != [],
    # The teacher finished; the student has just started (no checkpoint of its own).
    "student_before_its_checkpoint": lambda w: os.path.exists(
        os.path.join(w, "kd", "config.json")),
    # The student's first checkpoint is complete.
    "student_after_first_checkpoint": lambda w: _steps(os.path.join(w, "kd")) != [],
    # A checkpoint directory is being written (orbax's temporary name is present).
    "during_checkpoint_write": lambda w: bool(glob.glob(os.path.join(w, "*", "checkpoints",
                                                                     "*tmp*"))),
}


@pytest.mark.parametrize("point", [
    # One kill point in the default run; the others (~40 s each here) with the slow tests.
    point if point == "teacher_after_first_checkpoint" else pytest.param(
        point, marks=pytest.mark.slow) for point in sorted(KILL_POINTS)])
def test_sigkill_at_any_point_then_rerun_is_bit_identical(point, uninterrupted, tmp_path,
                                                          data_dir):
  process = _start(tmp_path, data_dir)
  reached = _wait_for(process, lambda: KILL_POINTS[point](str(tmp_path)))
  process.kill()
  process.wait()
  if not reached and point == "during_checkpoint_write":
    pytest.xfail("the checkpoint write was too quick to catch on this machine")
  assert reached, f"never reached kill point {point}"
  run_python(_args(tmp_path, data_dir))
  _assert_identical_runs(str(tmp_path), uninterrupted)


def test_sigterm_checkpoints_exits_cleanly_and_rerun_continues(uninterrupted, tmp_path,
                                                               data_dir):
  process = _start(tmp_path, data_dir)
  assert _wait_for(process, lambda: _steps(os.path.join(str(tmp_path), "teacher")) != [])
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 75, output  # EX_TEMPFAIL: checkpointed, run again.
  assert "received SIGTERM: checkpoint written at step" in output
  assert "Traceback" not in output
  result = run_python(_args(tmp_path, data_dir))
  assert "[teacher] resumed from step" in result.stdout
  _assert_identical_runs(str(tmp_path), uninterrupted)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path,
                                                                    data_dir):
  import shutil
  shutil.copytree(uninterrupted, tmp_path / "w")
  workdir = tmp_path / "w"
  os.remove(workdir / "kd" / "run_summary.json")
  latest = max(_steps(str(workdir / "kd")))
  for path in glob.glob(str(workdir / "kd" / "checkpoints" / str(latest) / "state" / "**" / "d" /
                            "*"), recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  result = run_python(_args(workdir, data_dir))
  assert f"Checkpoint at step {latest}" in result.stdout and "damaged" in result.stdout
  assert "[kd] resumed from step" in result.stdout
  assert os.path.isdir(workdir / "kd" / "checkpoints" / f"{latest}.damaged")
  _assert_identical_runs(str(workdir), uninterrupted)


def test_all_checkpoints_damaged_refuses_to_restart_from_zero(uninterrupted, tmp_path, data_dir):
  import shutil
  shutil.copytree(uninterrupted, tmp_path / "w")
  workdir = tmp_path / "w"
  os.remove(workdir / "kd" / "run_summary.json")
  for step in _steps(str(workdir / "kd")):
    os.remove(workdir / "kd" / "checkpoints" / str(step) / "meta" / "metadata")
  result = run_python(_args(workdir, data_dir), check=False)
  assert result.returncode == 2
  assert "none could be restored" in result.stderr and "refusing to restart from step 0" in \
      result.stderr
  again = run_python(_args(workdir, data_dir), check=False)  # Still refused the second time.
  assert again.returncode == 2 and "holds only damaged checkpoints" in again.stderr


@pytest.mark.slow  # Kill/rerun of methods with state (~1.5 min here).
def test_method_parameters_and_state_resume_exactly(tmp_path, data_dir):
  """CTKD's learnable temperature (method params) and TAID's schedule (method state)."""
  args = SMOKE + ["--config.suite=teacher,ctkd,taid", "--config.num_steps=60",
                  "--config.teacher.num_steps=20", f"--config.data_dir={data_dir}"]
  run_python(args + [f"--workdir={tmp_path / 'reference'}"])
  workdir = tmp_path / "interrupted"
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  for run in ("ctkd", "taid"):  # Kill once inside each run, after its first checkpoint.
    process = subprocess.Popen([sys.executable] + args + [f"--workdir={workdir}"], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(process, lambda: _steps(str(workdir / run)) != [])
    process.kill()
    process.wait()
  run_python(args + [f"--workdir={workdir}"])
  for run in ("ctkd", "taid"):
    got, want = _final_state(str(workdir / run)), _final_state(str(tmp_path / "reference" / run))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want))), run
  assert _final_state(str(workdir / "ctkd"))["params"]["method"]  # It has trainable params.
  assert _final_state(str(workdir / "taid"))["method_state"]  # It has state.


def test_checkpoint_of_another_state_layout_is_refused_and_kept_not_set_aside(tmp_path):
  """A code change (a parameter added or reshaped) is not damage: the error lists what
  differs and the checkpoint stays where it is; damaged data is still set aside."""
  import jax
  import numpy as np
  from kdjax.train.checkpoint import CheckpointError, Checkpointer

  state = {"params": {"w": np.ones((3, 2), np.float32)}, "step": np.int32(5)}
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(5, state, {"model": "mlp"})
  changed = {"params": {"w": jax.ShapeDtypeStruct((3, 4), np.float32),
                        "connector": jax.ShapeDtypeStruct((2,), np.float32)},
             "step": jax.ShapeDtypeStruct((), np.int32)}
  with pytest.raises(CheckpointError, match=r"\(step 5\) was written by a different version of "
                                            r"the train state; it is kept in place.*missing "
                                            r"\[\"\['params'\]\['connector'\]\"\].*shape "
                                            r"\['params'\]\['w'\]: checkpoint \(3, 2\) vs model "
                                            r"\(3, 4\)"):
    checkpointer.restore_latest_good(changed)
  assert sorted(os.listdir(tmp_path)) == ["5"]  # Not moved aside as '5.damaged'.
  same = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  step, restored, _ = checkpointer.restore_latest_good(same)
  assert step == 5 and restored["params"]["w"].shape == (3, 2)
