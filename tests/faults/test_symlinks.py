"""A symbolic link planted in a workdir is never written through: every file kdjax creates,
truncates, appends to, renames onto or deletes is refused in one line, and nothing outside
the workdir changes (issue 24: `ln -s ~/victim W/.kdjax.lock` replaced the victim's contents)."""

import os

import numpy as np
import pytest

from fault_helpers import plant_symlink, victim
from kdjax.train import WorkdirLock, files, metrics
from kdjax.train.checkpoint import Checkpointer
from kdjax.train.workdir import prepare_workdir


def _refused(path):
  return pytest.raises(files.UnsafePathError,
                       match=rf"^Refusing to write through the symbolic link {path}; remove it")


def test_lock_file_linked_to_a_victim_is_refused_and_the_victim_kept(tmp_path):
  target = victim(tmp_path)
  workdir = tmp_path / "w"
  workdir.mkdir()
  plant_symlink(str(workdir / ".kdjax.lock"), target)
  with _refused(workdir / ".kdjax.lock"):
    with WorkdirLock(str(workdir)):
      pass
  assert open(target).read() == "precious\n"


def test_lock_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
  os.mkfifo(tmp_path / ".kdjax.lock")
  with pytest.raises(files.UnsafePathError, match="the special file"):
    with WorkdirLock(str(tmp_path)):
      pass


@pytest.mark.parametrize("where", ["kd", "kd/checkpoints/20", "kd/metrics.jsonl.tmp",
                                   "kd/tensorboard"])
def test_taking_a_workdir_refuses_a_link_anywhere_in_it(tmp_path, where):
  """A run directory linked elsewhere would receive its checkpoints (and orbax's deletion of
  old steps); a link at a predictable name would be written through."""
  outside = tmp_path / "outside"
  outside.mkdir()
  workdir = tmp_path / "w"
  (workdir / "kd" / "checkpoints").mkdir(parents=True)
  (workdir / "kd" / "tensorboard").mkdir()
  plant_symlink(str(workdir / where), str(outside))
  with _refused(workdir / where):
    with WorkdirLock(str(workdir)):
      pass
  assert os.listdir(outside) == []
  with WorkdirLock(str(workdir), enabled=False):  # Processes 1.. of a multi-host run.
    pass


def test_workdir_itself_may_be_a_link_the_user_chose(tmp_path):
  (tmp_path / "real").mkdir()
  os.symlink(tmp_path / "real", tmp_path / "w")
  assert prepare_workdir(str(tmp_path / "w")) == str(tmp_path / "w")
  with WorkdirLock(str(tmp_path / "w")):
    assert os.path.isfile(tmp_path / "real" / ".kdjax.lock")
  assert sorted(os.listdir(tmp_path / "real")) == [".kdjax.lock"]  # The write probe is gone.


@pytest.mark.parametrize("name", ["config.json", "run_summary.json", "summary.json",
                                  "results.md", "results.png"])
def test_atomic_writes_refuse_a_link_at_the_file(tmp_path, name):
  target = victim(tmp_path)
  plant_symlink(str(tmp_path / name), target)
  with _refused(tmp_path / name):
    files.write_atomic(str(tmp_path / name), b"new")
  assert open(target).read() == "precious\n"
  assert sorted(os.listdir(tmp_path)) == sorted([name, "outside"])  # No temporary file left.


def test_metrics_append_refuses_a_link(tmp_path):
  target = victim(tmp_path)
  run_dir = tmp_path / "kd"
  run_dir.mkdir()
  plant_symlink(str(run_dir / "metrics.jsonl"), target)
  writer = metrics.MetricWriter(str(run_dir))
  with _refused(run_dir / "metrics.jsonl"):
    writer.write(20, "train", {"loss": 1.0})
  writer.close()
  assert open(target).read() == "precious\n"


def test_resume_does_not_follow_a_link_at_the_old_temporary_metrics_name(tmp_path):
  """Issue 24: a link at `metrics.jsonl.tmp` made a resumed run overwrite the victim and turn
  metrics.jsonl into a link to it. The rewrite now goes through an unpredictable O_EXCL
  temporary name: the link is neither followed nor used."""
  target = victim(tmp_path)
  run_dir = tmp_path / "kd"
  run_dir.mkdir()
  writer = metrics.MetricWriter(str(run_dir))
  for step in (10, 20, 30):
    writer.write(step, "train", {"loss": step / 10})
  plant_symlink(str(run_dir / "metrics.jsonl.tmp"), target)
  writer.truncate_after(20)
  writer.close()
  assert open(target).read() == "precious\n"
  assert not os.path.islink(run_dir / "metrics.jsonl")
  assert [line["step"] for line in metrics.read_metrics(str(run_dir))] == [10, 20]


def test_remove_deletes_a_link_never_its_target(tmp_path):
  target = victim(tmp_path)
  plant_symlink(str(tmp_path / "x"), target)
  files.remove(str(tmp_path / "x"))
  assert not os.path.lexists(tmp_path / "x") and open(target).read() == "precious\n"
  with pytest.raises(IsADirectoryError):  # Damaged directories are set aside, not deleted.
    files.remove(str(tmp_path / "outside"))


def test_checkpointer_refuses_a_step_linked_outside(tmp_path):
  """Orbax reads, writes and deletes old steps through links; the checkpointer refuses them
  before orbax sees the directory."""
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep").write_text("x")
  directory = tmp_path / "checkpoints"
  checkpointer = Checkpointer(str(directory), max_to_keep=1)
  checkpointer.save(10, {"w": np.ones(3, np.float32)}, {"model": "m"})
  checkpointer.close()
  os.symlink(outside, directory / "5")
  with _refused(directory / "5"):
    Checkpointer(str(directory), max_to_keep=1)
  assert os.listdir(outside) == ["keep"]
