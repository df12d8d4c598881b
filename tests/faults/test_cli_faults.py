"""`experiments.main` meeting a damaged or hostile workdir, end to end: the finished smoke runs
(conftest.smoke_suite) are copied per fault, damaged, and the same command is run again.
Where the run can continue, its final numbers and parameters equal the uninterrupted run's;
where it cannot, it ends in one line with status 2 and changes nothing."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import copy_runs, run_python, snapshot
from fault_helpers import (array_data_file, assert_one_line_error, checkpoint_steps, flip_byte,
                           overwrite, plant_symlink, suite, victim)
from kdjax.train.checkpoint import Checkpointer

_SAME = ("eval_accuracy", "final_train_loss", "eval_cross_entropy", "teacher_agreement", "steps")


@pytest.fixture
def workdir(smoke_suite, tmp_path):
  """A copy of the smoke quickstart's finished teacher and kd runs."""
  return copy_runs(smoke_suite[0], tmp_path / "w", ["teacher", "kd"])


def _summary(run_dir):
  with open(os.path.join(run_dir, "run_summary.json")) as f:
    return json.load(f)


def _assert_same_run(got_dir, want_dir):
  got, want = _summary(got_dir), _summary(want_dir)
  assert {k: got.get(k) for k in _SAME} == {k: want.get(k) for k in _SAME}
  states = []
  for run_dir in (got_dir, want_dir):
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    states.append(checkpointer.restore_raw(checkpointer.latest_step()))
    checkpointer.close()
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, *states))), "parameters differ"
  assert _logged(got_dir) == _logged(want_dir)


def _logged(run_dir):
  """metrics.jsonl's lines without the timing (examples_per_sec differs run to run)."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "examples_per_sec"}
            for line in f]


def test_flipped_byte_in_the_latest_checkpoint_resumes_from_the_previous_one(
    workdir, smoke_suite, data_dir):
  """Issue 24: the rerun said "resumed from step 20" of a damaged step 40... and ended with
  other numbers. Now step 40 is set aside in one line and the run redone from step 20; a
  half-written last metrics line (the kill's) is dropped."""
  kd = os.path.join(workdir, "kd")
  os.remove(os.path.join(kd, "run_summary.json"))
  flip_byte(array_data_file(os.path.join(kd, "checkpoints", "40")))
  with open(os.path.join(kd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 40, "split": "ev')
  result = suite(workdir, data_dir, check=True)
  assert "Traceback" not in result.stdout + result.stderr
  [line] = [l for l in result.stdout.splitlines() if "damaged" in l]
  assert line.startswith(f"[kd] Checkpoint at step 40 in {kd}/checkpoints is damaged (checksum "
                         f"mismatch in ")
  assert line.endswith("set aside as 40.damaged, using step 20.")
  assert "[kd] resumed from step 20" in result.stdout
  _assert_same_run(kd, os.path.join(smoke_suite[0], "kd"))
  assert checkpoint_steps(kd) == [20, 40]


def test_lock_file_linked_to_a_victim_is_refused(tmp_path, data_dir):
  target = victim(tmp_path)
  workdir = tmp_path / "w"
  workdir.mkdir()
  plant_symlink(str(workdir / ".kdjax.lock"), target)
  result = suite(workdir, data_dir)
  assert_one_line_error(result, 2, f"Refusing to write through the symbolic link {workdir}/"
                        ".kdjax.lock; remove it")
  assert open(target).read() == "precious\n"
  assert os.listdir(workdir) == [".kdjax.lock"]


@pytest.mark.slow  # The lock's own refusal is in the default run (and in-process, every link).
def test_run_directory_linked_outside_is_refused(workdir, tmp_path, data_dir):
  outside = tmp_path / "elsewhere"
  shutil.move(os.path.join(workdir, "kd"), outside)
  os.symlink(outside, os.path.join(workdir, "kd"))
  before = snapshot(outside)
  result = suite(workdir, data_dir)
  assert_one_line_error(result, 2, f"the symbolic link {workdir}/kd; remove it")
  assert snapshot(outside) == before


@pytest.mark.parametrize("name, content, reason", [
    ("config.json", b'{"method": "kd", "stu', "not JSON"),
    ("run_summary.json", b"", "empty"),
])
def test_damaged_run_file_is_one_line_and_changes_nothing(workdir, data_dir, name, content,
                                                          reason):
  overwrite(os.path.join(workdir, "kd", name), content)
  before = snapshot(workdir)
  result = suite(workdir, data_dir)
  assert_one_line_error(result, 2, f"{workdir}/kd/{name} is damaged ({reason}",
                        "delete it and rerun the same command")
  after = snapshot(workdir)
  after.pop(".kdjax.lock", None)
  # The suite writes the finished teacher's row before it reaches kd (run_summary.json is
  # read when kd's turn comes; config.json already while the suite is planned).
  after.pop("summary.json", None)
  assert after == before


@pytest.mark.slow  # Two more runs of the command (~20 s here).
def test_following_the_damaged_summary_advice_restores_the_same_result(
    workdir, smoke_suite, data_dir):
  overwrite(os.path.join(workdir, "kd", "run_summary.json"), b"")
  assert suite(workdir, data_dir).returncode == 2
  os.remove(os.path.join(workdir, "kd", "run_summary.json"))
  suite(workdir, data_dir, check=True)
  got, want = os.path.join(workdir, "kd"), os.path.join(smoke_suite[0], "kd")
  _assert_same_run(got, want)


def test_damaged_teacher_checkpoint_is_refused_naming_its_step(workdir, data_dir):
  """The suite's own teacher, finished, with its final checkpoint damaged: the student is
  never trained against it (nor against its step 40)."""
  teacher = os.path.join(workdir, "teacher", "checkpoints")
  shutil.rmtree(os.path.join(workdir, "kd"))
  flip_byte(array_data_file(os.path.join(teacher, "60")))
  result = suite(workdir, data_dir)
  assert_one_line_error(
      result, 2, f"The checkpoint {teacher}/60 is damaged (checksum mismatch in ",
      f"move it aside (mv {teacher}/60 {teacher}/60.damaged) and delete {workdir}/teacher/"
      "run_summary.json")
  assert not os.path.exists(os.path.join(workdir, "kd", "checkpoints"))


@pytest.mark.slow  # Retrains the teacher's last 20 steps and the student (~25 s here).
def test_following_the_damaged_teacher_advice_gives_the_uninterrupted_result(
    workdir, smoke_suite, data_dir):
  teacher = os.path.join(workdir, "teacher")
  shutil.rmtree(os.path.join(workdir, "kd"))
  flip_byte(array_data_file(os.path.join(teacher, "checkpoints", "60")))
  os.rename(os.path.join(teacher, "checkpoints", "60"),
            os.path.join(teacher, "checkpoints", "60.damaged"))
  os.remove(os.path.join(teacher, "run_summary.json"))
  result = suite(workdir, data_dir, check=True)
  assert "[teacher] resumed from step 40" in result.stdout
  for run in ("teacher", "kd"):
    _assert_same_run(os.path.join(workdir, run), os.path.join(smoke_suite[0], run))


@pytest.mark.slow  # In-process: test_damaged_files.test_report_on_a_corrupt_summary_...
def test_report_on_a_corrupt_summary_is_one_line(workdir):
  overwrite(os.path.join(workdir, "summary.json"), b'{"runs": {"kd": ')
  result = run_python(["-m", "experiments.report", f"--workdir={workdir}"], check=False)
  assert_one_line_error(result, 2, f"{workdir}/summary.json is damaged (not JSON",
                        "rerun the experiments.main command that wrote it")
  assert not os.path.exists(os.path.join(workdir, "results.md"))


@pytest.mark.slow
def test_teacher_checkpoint_that_is_a_file_says_so(tmp_path, data_dir):
  path = tmp_path / "teacher.ckpt"
  path.write_bytes(b"not a checkpoint")
  result = run_python(["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
                       "--config.suite=kd", f"--config.teacher.checkpoint={path}",
                       f"--workdir={tmp_path / 'w'}", f"--config.data_dir={data_dir}"],
                      check=False)
  assert_one_line_error(result, 2, "is a file, not a checkpoint directory")
