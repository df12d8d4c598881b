"""kdjax.report (and its command line, experiments.report): tables, curves, the figure, on
hand-written workdirs."""

import csv
import io
import json
import os

import numpy as np
import pytest

from conftest import run_python
from experiments import report, report_plots
from kdjax.report import plots


def _write_run(directory, lines, summary=None):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  if summary is not None:
    with open(os.path.join(directory, "run_summary.json"), "w") as f:
      json.dump(summary, f)


def _train(step, **scalars):
  return {"step": step, "split": "train", **scalars}


def _eval(step, accuracy):
  return {"step": step, "split": "eval", "accuracy": accuracy}


def make_suite(workdir):
  """A suite with a teacher, kd over seeds 0 and 1, and a born-again ensemble row."""
  _write_run(os.path.join(workdir, "teacher"),
             [_train(10, loss=1.0), _train(20, loss=0.5), _eval(20, 0.9)])
  _write_run(os.path.join(workdir, "kd", "seed0"),
             [_train(10, loss=5.0, ce=2.0), _train(20, loss=4.0, ce=1.0), _eval(20, 0.7)])
  _write_run(os.path.join(workdir, "kd", "seed1"),
             [_train(10, loss=6.0, ce=3.0), _eval(20, 0.8)])  # Its step-20 train line lost.
  summary = {
      "runs": {
          "teacher": {"eval_accuracy": 0.9, "best_eval_accuracy": 0.9, "steps": 20,
                      "final_train_loss": 0.5, "method": "scratch", "student": "cnn1d"},
          "kd": {"eval_accuracy": 0.75, "best_eval_accuracy": 0.75, "teacher_agreement": 0.8,
                 "steps": 20, "method": "kd", "student": "mlp", "num_seeds": 2,
                 "std": {"eval_accuracy": 0.0707, "best_eval_accuracy": 0.0707,
                         "teacher_agreement": 0.01},
                 "seeds": {"0": {}, "1": {}}}},
      "ensembles": {"born_again": {"eval_accuracy": 0.76, "generations": 2,
                                   "method": "born_again", "student": "mlp"}}}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  return summary


def test_tables_of_a_suite(tmp_path):
  summary = make_suite(tmp_path)
  rows = report.workdir_rows([str(tmp_path)])
  assert [row.name for row in rows] == ["teacher", "kd", "born_again ensemble (2)"]
  assert rows[1].directories == (str(tmp_path / "kd" / "seed0"), str(tmp_path / "kd" / "seed1"))
  assert rows[2].is_ensemble
  lines = report.markdown_table(rows).splitlines()
  assert lines[3] == ("| kd | kd | mlp | 0.7500 ± 0.0707 (2) | 0.7500 ± 0.0707 (2) | "
                      "0.8000 ± 0.0100 (2) | – | 20 | – |")
  assert report.results_table(summary) == report.markdown_table(report.summary_rows(summary))
  table = list(csv.DictReader(io.StringIO(report.csv_table(rows))))
  assert [r["run"] for r in table] == ["teacher", "kd", "born_again ensemble (2)"]
  assert float(table[1]["eval_accuracy"]) == 0.75
  assert float(table[1]["eval_accuracy_std"]) == 0.0707
  assert table[1]["num_seeds"] == "2" and table[0]["num_seeds"] == "1"
  assert table[0]["teacher_agreement"] == "" and table[0]["eval_accuracy_std"] == ""


def test_curves_use_the_ce_term_and_average_over_seeds(tmp_path):
  make_suite(tmp_path)
  teacher, kd, _ = report.workdir_rows([str(tmp_path)])
  steps, mean, std, key = report_plots.row_curves(kd)["train"]
  # Only step 10 was logged by both seeds: ce 2 and 3 -> mean 2.5, std (ddof 1) sqrt(0.5).
  assert key == "ce" and steps == [10]
  assert mean == [2.5] and std == pytest.approx([np.sqrt(0.5)])
  steps, mean, std = report_plots.row_curves(kd)["eval"]
  assert steps == [20] and mean == pytest.approx([0.75]) and std == pytest.approx([0.0707107])
  steps, mean, std, key = report_plots.row_curves(teacher)["train"]
  assert key == "loss" and steps == [10, 20] and mean == [1.0, 0.5] and std == [0.0, 0.0]


def test_several_workdirs_and_a_single_run(tmp_path):
  make_suite(tmp_path / "a" / "suite")
  make_suite(tmp_path / "b" / "suite")
  _write_run(tmp_path / "one", [_train(10, loss=1.0, ce=1.0), _eval(10, 0.5)],
             {"eval_accuracy": 0.5, "method": "kd", "student": "mlp", "steps": 10})
  rows = report.workdir_rows([str(tmp_path / "a" / "suite"), str(tmp_path / "b" / "suite"),
                              str(tmp_path / "one")])
  assert [row.name for row in rows] == [
      "a/suite/teacher", "a/suite/kd", "a/suite/born_again ensemble (2)",
      "b/suite/teacher", "b/suite/kd", "b/suite/born_again ensemble (2)", "one"]
  assert rows[-1].directories == (str(tmp_path / "one"),)
  out = tmp_path / "out"
  table = report.write_rows_report(rows, str(out))
  assert table.count("\n") == 2 + len(rows)
  with open(out / "results.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (out / "results.md").read_text().endswith(table)
  assert len((out / "results.csv").read_text().splitlines()) == 1 + len(rows)


def test_unreadable_workdirs_are_named(tmp_path):
  with pytest.raises(report.ReportError, match=r"--workdir=.*missing: no such directory"):
    report.load_workdir(str(tmp_path / "missing"))
  with pytest.raises(report.ReportError, match="holds no summary.json .* nor run_summary.json"):
    report.load_workdir(str(tmp_path))
  (tmp_path / "summary.json").write_text(json.dumps({"runs": {}}))
  with pytest.raises(report.ReportError, match="lists no finished runs"):
    report.load_workdir(str(tmp_path))


def test_command_line(tmp_path):
  make_suite(tmp_path / "x")
  make_suite(tmp_path / "y")
  result = run_python(["-m", "experiments.report", f"--workdir={tmp_path / 'x'}",
                       f"--workdir={tmp_path / 'y'}", f"--out={tmp_path / 'both'}"])
  assert "| x/kd | kd | mlp | 0.7500 ± 0.0707 (2) |" in result.stdout
  assert sorted(os.listdir(tmp_path / "both")) == ["results.csv", "results.md", "results.png"]
  for args, message in (
      ([f"--workdir={tmp_path / 'nope'}"], f"Error: --workdir={tmp_path / 'nope'}: no such "
       "directory."),
      ([f"--workdir={tmp_path / 'x'}", f"--workdir={tmp_path / 'y'}"],
       "Error: --out is required with 2 workdirs")):
    failed = run_python(["-m", "experiments.report"] + args, check=False)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.strip().startswith(message) and "\n" not in failed.stderr.strip()


def test_language_model_suites_report_perplexity_and_acceptance(tmp_path):
  """Rows with `eval_perplexity` get the LM columns (perplexity, overlap, acceptance) in the
  table and CSV, and the figure's curves are exp(eval cross-entropy)."""
  lm = lambda ppl, accept: {"eval_perplexity": ppl, "eval_accuracy": 0.5, "steps": 20,
                            "teacher_agreement": 0.6, "eval_teacher_overlap": 0.7,
                            "spec_greedy_acceptance_rate": accept,
                            "spec_sampled_acceptance_rate": accept - 0.1,
                            "method": "kd", "student": "lm_student"}
  for name, ce in (("scratch", 2.0), ("kd", 1.5)):
    _write_run(os.path.join(tmp_path, name),
               [_train(10, loss=3.0, ce=3.0), {"step": 20, "split": "eval", "accuracy": 0.5,
                                               "cross_entropy": ce}])
  with open(os.path.join(tmp_path, "summary.json"), "w") as f:
    json.dump({"runs": {"scratch": lm(7.389, 0.4), "kd": lm(4.4817, 0.5)}}, f)
  rows = report.workdir_rows([str(tmp_path)])
  table = report.markdown_table(rows)
  assert "eval ppl" in table and "acceptance sampled" in table and "eval acc" not in table
  assert "| kd | kd | lm_student | 4.48 | 0.600 | 0.700 | 0.500 | 0.400 |" in table
  header = next(csv.reader(io.StringIO(report.csv_table(rows))))
  assert "eval_perplexity" in header and "spec_sampled_acceptance_rate_std" in header
  steps, mean, _ = report_plots.row_curves(rows[1], report_plots._quality(report.is_language_model_report(rows)))["eval"]
  assert steps == [20] and mean == pytest.approx([np.exp(1.5)])
  report_plots.plot_report(rows, str(tmp_path / "results.png"))
  assert os.path.getsize(tmp_path / "results.png") > 10_000


def test_experiments_report_is_kdjax_report():
  import kdjax.report  # pylint: disable=g-import-not-at-top
  assert report.write_report is kdjax.report.write_report
  assert report_plots.plot_report is plots.plot_report


def _rows_with_a_longer_teacher(workdir):
  """A teacher of 40 steps and students of 20, like the quickstart's 4000 and 2000."""
  _write_run(os.path.join(workdir, "teacher"),
             [_train(20, loss=1.0), _eval(20, 0.8), _train(40, loss=0.5), _eval(40, 0.9)])
  names = ("kd", "kd_std", "crd", "nkd", "dkd")
  results = {"teacher": {"eval_accuracy": 0.9, "method": "scratch", "student": "cnn1d"}}
  for i, name in enumerate(names):  # Near-equal points: their names would collide.
    _write_run(os.path.join(workdir, name),
               [_train(10, loss=2.0, ce=1.0), _train(20, loss=1.0, ce=0.5), _eval(20, 0.7)])
    results[name] = {"eval_accuracy": 0.795 + 0.001 * i, "teacher_agreement": 0.783 + 0.002 * i,
                     "method": name, "student": "mlp"}
  _write_run(os.path.join(workdir, "fitnet"), [_train(20, loss=1.0, ce=0.5), _eval(20, 0.84)])
  results["fitnet"] = {"eval_accuracy": 0.845, "teacher_agreement": 0.838, "method": "fitnet",
                       "student": "mlp"}  # Far from the others: they crowd in a corner.
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump({"runs": results}, f)
  return report.workdir_rows([str(workdir)])


def test_figure_shows_whole_curves_and_labels_that_do_not_overlap(tmp_path):
  rows = _rows_with_a_longer_teacher(tmp_path)
  figure = plots.draw_figure(rows)
  try:
    bars, scatter, train, evals = figure.axes[:4]
    # Runs of 40 and 20 steps: both drawn against the fraction of their own steps, whole.
    teacher_eval = [line for line in evals.get_lines() if line.get_linestyle() == "--"][0]
    assert list(teacher_eval.get_xdata()) == [0.5, 1.0]
    assert evals.get_xlim()[1] >= 1.0 and "fraction" in evals.get_xlabel()
    assert any("teacher 40; the other runs 20" in t.get_text() for t in evals.texts)
    renderer = figure.canvas.get_renderer()
    labels = [t for t in scatter.texts if t.get_text() in ("kd", "kd_std", "crd", "nkd", "dkd")]
    assert len(labels) == 5
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):
      for b in boxes[i + 1:]:
        assert not a.overlaps(b), (a, b)
  finally:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    plt.close(figure)


def test_equal_lengths_keep_the_step_axis(tmp_path):
  make_suite(tmp_path)
  figure = plots.draw_figure(report.workdir_rows([str(tmp_path)]))
  try:
    assert figure.axes[3].get_xlabel() == "step"
  finally:
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    plt.close(figure)
