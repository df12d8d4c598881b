"""Checksums recorded at save and verified at restore: a flipped byte that orbax does not
notice is damage like a truncated file (issue 24: a run resumed from one "worked" and ended
with other numbers). A run's own checkpoint falls back to the previous good step; a
teacher's, an exported model's or `load_run`'s is refused in one line naming the file."""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from fault_helpers import array_data_file, flip_byte, overwrite, truncate
from kdjax.train import checkpoint
from kdjax.train.checkpoint import CheckpointError, Checkpointer


def _state(step: int):
  """Incompressible weights (as trained ones are): a flipped byte lands in raw array data."""
  rng = np.random.default_rng(step)
  return {"params": {"student": {"w": rng.normal(size=(4096,)).astype(np.float32)}},
          "model_state": {"mean": rng.normal(size=(8,)).astype(np.float32)},
          "step": np.int32(step)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint directory with steps 10 and 20 (copied per test, never changed)."""
  directory = str(tmp_path_factory.mktemp("saved") / "checkpoints")
  checkpointer = Checkpointer(directory, max_to_keep=3)
  for step in (10, 20):
    checkpointer.save(step, _state(step), {"model": "mlp"})
  checkpointer.close()
  return directory


@pytest.fixture
def directory(saved, tmp_path):
  copy = str(tmp_path / "run" / "checkpoints")
  shutil.copytree(saved, copy)
  return copy


def test_checksums_are_of_dtype_shape_and_bytes(saved):
  meta = Checkpointer(saved).restore_meta(20)
  w = _state(20)["params"]["student"]["w"]
  want = hashlib.sha256(b"float32|(4096,)|" + w.tobytes()).hexdigest()
  assert meta["checksums"]["params/student/w"] == want
  assert set(meta["checksums"]) == {"params/student/w", "model_state/mean", "step"}


def _restore_latest_good(directory):
  lines = []
  step, state, _ = Checkpointer(directory).restore_latest_good(_abstract(), log=lines.append)
  return step, state, lines


def test_flipped_byte_in_array_data_falls_back_to_the_previous_step(directory):
  flip_byte(array_data_file(os.path.join(directory, "20")))
  step, state, lines = _restore_latest_good(directory)
  assert step == 10
  np.testing.assert_array_equal(state["params"]["student"]["w"],
                                _state(10)["params"]["student"]["w"])
  assert lines == [f"Checkpoint at step 20 in {directory} is damaged (checksum mismatch in 1 of "
                   f"3 arrays of {directory}/20/state: params/student/w); set aside as "
                   "20.damaged, using step 10."]
  assert sorted(os.listdir(directory)) == ["10", "20.damaged"]


def test_changed_metadata_value_is_damage_not_another_run(directory):
  """A digit changed in the JSON metadata still parses; its checksum tells."""
  path = os.path.join(directory, "20", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  meta["model"] = "mlq"  # Would otherwise read as "a checkpoint of another model".
  overwrite(path, json.dumps(meta).encode())
  step, _, lines = _restore_latest_good(directory)
  assert step == 10 and f"checksum mismatch in {directory}/20/meta" in lines[0]


def test_truncated_array_data_falls_back_in_one_line(directory):
  truncate(array_data_file(os.path.join(directory, "20")))
  step, _, lines = _restore_latest_good(directory)
  assert step == 10 and len(lines) == 1 and "\n" not in lines[0]
  assert lines[0].startswith(f"Checkpoint at step 20 in {directory} is damaged (")
  assert lines[0].endswith("set aside as 20.damaged, using step 10.")


def test_every_step_damaged_is_refused_in_one_line(directory):
  for step in (10, 20):
    flip_byte(array_data_file(os.path.join(directory, str(step))))
  with pytest.raises(CheckpointError, match="refusing to restart from step 0") as error:
    _restore_latest_good(directory)
  assert "\n" not in str(error.value)


def test_checkpoint_saved_before_checksums_is_read_unverified(directory):
  """Checkpoints written by an older kdjax have no checksums: they still restore."""
  path = os.path.join(directory, "20", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  del meta["checksums"], meta["meta_sha256"]
  overwrite(path, json.dumps(meta).encode())
  assert _restore_latest_good(directory)[0] == 20


def _expected_variables():
  return {"params": {"w": jax.ShapeDtypeStruct((4096,), np.float32)},
          "mean": jax.ShapeDtypeStruct((8,), np.float32)}


def test_damaged_teacher_is_refused_in_one_line_naming_the_step(directory):
  flip_byte(array_data_file(os.path.join(directory, "20")))
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_model_variables(directory, _expected_variables(), model_name="mlp")
  assert str(error.value) == (
      f"The checkpoint {directory}/20 is damaged (checksum mismatch in 1 of 3 arrays of "
      f"{directory}/20/state: params/student/w); replace it with an intact copy.")
  assert sorted(os.listdir(directory)) == ["10", "20"]  # A teacher is read, never changed.


def test_damaged_finished_run_says_how_to_retrain_its_last_steps(directory):
  run_dir = os.path.dirname(directory)
  overwrite(os.path.join(run_dir, "run_summary.json"), b"{}")
  os.remove(os.path.join(directory, "20", "meta", "metadata"))
  with pytest.raises(CheckpointError) as error:
    checkpoint.load_model_variables(directory, _expected_variables(), model_name="mlp")
  message = str(error.value)
  assert message.startswith(f"The checkpoint {directory}/20 is damaged (") and "\n" not in message
  assert message.endswith(f"move it aside (mv {directory}/20 {directory}/20.damaged) and delete "
                          f"{run_dir}/run_summary.json; rerunning that run's command then trains "
                          "its last steps again from the previous checkpoint.")


def test_intact_teacher_loads(directory):
  variables = checkpoint.load_model_variables(directory, _expected_variables(), model_name="mlp")
  np.testing.assert_array_equal(variables["params"]["w"], _state(20)["params"]["student"]["w"])


def test_teacher_path_that_is_a_file_says_so(tmp_path):
  path = tmp_path / "teacher.ckpt"
  path.write_bytes(b"x")
  with pytest.raises(CheckpointError, match=r"is a file, not a checkpoint directory"):
    checkpoint.load_model_variables(str(path), _expected_variables(), model_name="mlp")
  assert checkpoint.checkpoint_path_problem(str(path)) == "is a file, not a checkpoint directory"
  assert checkpoint.checkpoint_path_problem(str(tmp_path / "no")) == "does not exist"
  assert checkpoint.checkpoint_path_problem(str(tmp_path)) is None


def _export(tmp_path):
  path = str(tmp_path / "model.msgpack")
  variables = {"params": {"w": _state(1)["params"]["student"]["w"]}, "mean": np.zeros(8, np.float32)}
  checkpoint.export_model_variables(variables, path, model_name="mlp", meta={"steps": 1})
  return path


def test_exported_model_truncated_names_the_file(tmp_path):
  path = _export(tmp_path)
  truncate(path, 0.9)
  with pytest.raises(CheckpointError, match=rf"^The exported model file {path} is damaged "
                                            r"\(.*\); export it again"):
    checkpoint.load_model_variables(path, _expected_variables(), model_name="mlp")


def test_exported_model_with_a_flipped_byte_fails_its_checksum(tmp_path):
  path = _export(tmp_path)
  with open(path, "rb") as f:
    data = f.read()
  flip_byte(path, data.index(_state(1)["params"]["student"]["w"].tobytes()) + 1000)
  with pytest.raises(CheckpointError, match=r"damaged \(checksum mismatch in params/w\)"):
    checkpoint.load_model_variables(path, _expected_variables(), model_name="mlp")


def test_shipped_lm_teacher_asset_truncated_names_the_file(tmp_path):
  asset = os.path.join(os.path.dirname(checkpoint.__file__), "..", "assets",
                       "lm_teacher_pydoc.msgpack")
  path = str(tmp_path / "lm_teacher_pydoc.msgpack")
  with open(os.path.normpath(asset), "rb") as f:
    overwrite(path, f.read(1 << 20))  # The first MiB of 8.
  with pytest.raises(CheckpointError) as error:
    checkpoint.exported_meta(path)
  assert str(error.value).startswith(f"The exported model file {path} is damaged (")
  assert "reinstall kdjax" in str(error.value) and "\n" not in str(error.value)


def test_teacher_provenance_records_step_and_state_digest(saved):
  from kdjax.train import provenance
  [record] = provenance.teacher_provenance([saved])
  meta = Checkpointer(saved).restore_meta(20)
  assert record == {"checkpoint": saved, "step": 20, "sha256": checkpoint.state_digest(meta)}
  assert len(record["sha256"]) == 64
