"""A damaged file kdjax wrote earlier ends in one line naming it and what to do (or is
recovered: a half-written last metrics line), never in a JSON traceback."""

import json
import os

import ml_collections
import pytest

from fault_helpers import overwrite
from kdjax.train import files, metrics
from kdjax.train.run_dir import check_run_dir


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"  \n", "empty"),
    (b'{"runs": {"kd": {"eval_acc', "not JSON: Unterminated string starting at: line 1 column 18 (char 17)"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_read_json_names_the_damaged_file(tmp_path, data, reason):
  path = tmp_path / "run_summary.json"
  overwrite(str(path), data)
  with pytest.raises(files.DamagedFileError) as error:
    files.read_json(str(path))
  assert str(error.value) == (
      f"{path} is damaged ({reason}); delete it and rerun the same command: the run's final "
      "checkpoint is kept, so only its final evaluation runs again.")


def _lines(*steps):
  return "".join(json.dumps({"step": s, "split": "train", "loss": s / 10}) + "\n" for s in steps)


def test_half_written_last_metrics_line_is_dropped_on_resume(tmp_path):
  """A kill during a write leaves a line without its newline: the resumed run drops it and
  logs that step again."""
  overwrite(str(tmp_path / "metrics.jsonl"), (_lines(10, 20) + '{"step": 30, "spl').encode())
  assert [l["step"] for l in metrics.read_metrics(str(tmp_path))] == [10, 20]
  writer = metrics.MetricWriter(str(tmp_path))
  writer.truncate_after(20)
  writer.write(30, "train", {"loss": 3.0})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read() == _lines(10, 20, 30)


def test_damaged_metrics_line_inside_the_file_names_file_and_line(tmp_path):
  overwrite(str(tmp_path / "metrics.jsonl"), (_lines(10) + "garbage\n" + _lines(20)).encode())
  with pytest.raises(files.DamagedFileError,
                     match=rf"^{tmp_path}/metrics.jsonl is damaged \(line 2: Expecting value"):
    metrics.read_metrics(str(tmp_path))


def test_corrupt_run_config_is_one_line_before_any_work(tmp_path):
  run_dir = tmp_path / "kd"
  run_dir.mkdir()
  overwrite(str(run_dir / "config.json"), b'{"method": "kd", "stud')
  config = ml_collections.ConfigDict({"method": "kd"})
  with pytest.raises(files.DamagedFileError) as error:
    check_run_dir(config, str(run_dir), "kd")
  assert str(error.value).startswith(f"{run_dir}/config.json is damaged (not JSON: ")
  assert str(error.value).endswith("delete it and rerun the same command (the run's "
                                   "checkpoints record its config's fingerprint, which is "
                                   "still checked).")
  overwrite(str(run_dir / "config.json"), b"[1, 2]")
  with pytest.raises(files.DamagedFileError, match=r"\(a JSON list, not a config\)"):
    check_run_dir(config, str(run_dir), "kd")


def test_report_on_a_corrupt_summary_is_a_report_error(tmp_path):
  from experiments import report
  overwrite(str(tmp_path / "summary.json"), b'{"runs": {"kd"')
  with pytest.raises(report.ReportError) as error:
    report.load_workdir(str(tmp_path))
  assert str(error.value).startswith(f"{tmp_path}/summary.json is damaged (not JSON: ")
  assert "rerun the experiments.main command that wrote it" in str(error.value)


def test_load_run_with_a_corrupt_config_names_it(tmp_path):
  import kdjax
  (tmp_path / "checkpoints").mkdir()
  overwrite(str(tmp_path / "config.json"), b"")
  with pytest.raises(files.DamagedFileError, match=rf"^{tmp_path}/config.json is damaged "
                                                   r"\(empty\)"):
    kdjax.load_run(str(tmp_path))


def test_results_png_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  """A full disk while writing results.png keeps the previous picture (it was written in
  place: a kill left it 0 bytes) and names the file."""
  from experiments import report_plots
  overwrite(str(tmp_path / "results.png"), b"previous")
  real_fdopen = os.fdopen

  class Full:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, data):
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
  rows = []
  with pytest.raises(files.DiskFullError, match=rf"while writing {tmp_path}/results.png; the "
                                                "previous version of the file is kept"):
    report_plots.plot_report(rows, str(tmp_path / "results.png"))
  assert (tmp_path / "results.png").read_bytes() == b"previous"
  assert os.listdir(tmp_path) == ["results.png"]


def test_a_directory_setting_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "home").write_text("")
  with pytest.raises(files.WorkdirError, match=rf"^KDJAX_DATA_DIR={tmp_path}/home cannot be a "
                                               "directory: it is a file; point it at a directory"):
    files.check_directory_path(str(tmp_path / "home"), "KDJAX_DATA_DIR")
  with pytest.raises(files.WorkdirError, match=rf"\({tmp_path}/home is a file\)"):
    files.check_directory_path(str(tmp_path / "home" / "tensorflow_datasets"), "data_dir")
  files.check_directory_path(str(tmp_path / "new" / "dir"), "data_dir")  # Creatable: fine.


def test_a_run_restored_at_its_last_step_drops_its_final_evaluation(tmp_path):
  """Its summary lost, a finished run restores its last step and evaluates again."""
  final = {"step": 40, "split": "eval", "accuracy": 0.3}
  overwrite(str(tmp_path / "metrics.jsonl"),
            (_lines(20, 40) + json.dumps(final) + "\n").encode())
  writer = metrics.MetricWriter(str(tmp_path))
  writer.truncate_after(40, keep_evaluations=False)
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert f.read() == _lines(20, 40)  # The train line at 40 stays, its evaluation goes.
