"""Results of a suite: `results.md` (a table) and `results.png` (accuracy bars, curves)."""

import math
import os

from kdjax.train import files
from kdjax.train.metrics import read_metrics

_COLUMNS = (("eval_accuracy", "eval acc (last)", "{:.4f}"),
            ("best_eval_accuracy", "eval acc (best)", "{:.4f}"),
            ("teacher_agreement", "teacher agreement", "{:.4f}"),
            ("final_train_loss", "final train loss", "{:.4f}"),
            ("steps", "steps", "{}"),
            ("train_examples_per_sec", "train ex/s", "{:,.0f}"))


def results_table(summary: dict) -> str:
  """A markdown table with one row per run."""
  header = "| run | method | model | " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
  rule = "|" + " --- |" * (3 + len(_COLUMNS))
  rows = []
  for run, result in summary["runs"].items():
    cells = []
    for key, _, fmt in _COLUMNS:
      value = result.get(key)
      cells.append("–" if value is None or (isinstance(value, float) and math.isnan(value))
                   else fmt.format(value))
    rows.append(f"| {run} | {result.get('method', '')} | {result.get('student', '')} | "
                + " | ".join(cells) + " |")
  return "\n".join([header, rule] + rows) + "\n"


def plot_results(summary: dict, workdir: str, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = list(summary["runs"])
  figure, (bars, train, evals) = plt.subplots(1, 3, figsize=(15, 4))
  accuracies = [summary["runs"][r]["eval_accuracy"] for r in runs]
  bars.bar(runs, accuracies, color="tab:blue")
  bars.set_ylim(max(0.0, min(accuracies) - 0.1), min(1.0, max(accuracies) + 0.05))
  for i, value in enumerate(accuracies):
    bars.text(i, value, f"{value:.3f}", ha="center", va="bottom")
  bars.set_title("eval accuracy")
  for run in runs:
    lines = read_metrics(os.path.join(workdir, run))
    train_lines = [l for l in lines if l["split"] == "train"]
    eval_lines = [l for l in lines if l["split"] == "eval"]
    train.plot([l["step"] for l in train_lines], [l["loss"] for l in train_lines], label=run)
    evals.plot([l["step"] for l in eval_lines], [l["accuracy"] for l in eval_lines], "o-",
               label=run)
  train.set(title="train loss", xlabel="step", yscale="log")
  evals.set(title="eval accuracy", xlabel="step")
  train.legend()
  evals.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def write_report(summary: dict, workdir: str) -> str:
  """Writes results.md and results.png into workdir; returns the table."""
  table = results_table(summary)
  files.write_atomic(os.path.join(workdir, "results.md"), "# Results\n\n" + table)
  plot_results(summary, workdir, os.path.join(workdir, "results.png"))
  return table
