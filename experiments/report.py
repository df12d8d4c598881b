"""Results of a suite: `results.md` (a table) and `results.png` (accuracy bars, curves).

A row run over several seeds (`config.seeds`, see `kdjax/train/suite.py`) holds the mean of
its seeds under the usual keys, their standard deviation in `std` and their count in
`num_seeds`: the table shows its accuracy columns as `mean ± std (n)` and the plots the mean,
with the standard deviation as error bars. Ensembles (`summary['ensembles']`, the born-again
generations) are extra rows of the table and bars of the plot.
"""

import math
import os

from kdjax.train import files
from kdjax.train.metrics import read_metrics

# (summary key, column title, format, is an accuracy: shown as mean ± std (n) over seeds).
_COLUMNS = (("eval_accuracy", "eval acc (last)", "{:.4f}", True),
            ("best_eval_accuracy", "eval acc (best)", "{:.4f}", True),
            ("teacher_agreement", "teacher agreement", "{:.4f}", True),
            ("final_train_loss", "final train loss", "{:.4f}", False),
            ("steps", "steps", "{}", False),
            ("train_examples_per_sec", "train ex/s", "{:,.0f}", False))


def _missing(value) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def format_cell(result: dict, key: str, fmt: str, is_accuracy: bool) -> str:
  """One cell: the value, `mean ± std (n)` for an accuracy of a row over seeds, '–' if none."""
  value = result.get(key)
  if _missing(value):
    return "–"
  if key == "steps":
    value = int(round(value))
  if is_accuracy and "num_seeds" in result:
    std = result.get("std", {}).get(key, float("nan"))
    return f"{fmt.format(value)} ± {fmt.format(std)} ({result['num_seeds']})"
  return fmt.format(value)


def table_rows(summary: dict) -> list:
  """(name, result) of every row: the runs, then the ensembles."""
  rows = list(summary["runs"].items())
  for name, result in summary.get("ensembles", {}).items():
    rows.append((f"{name} ensemble ({result.get('generations', '?')})", result))
  return rows


def results_table(summary: dict) -> str:
  """A markdown table with one row per suite row (and ensemble)."""
  header = "| run | method | model | " + " | ".join(c[1] for c in _COLUMNS) + " |"
  rule = "|" + " --- |" * (3 + len(_COLUMNS))
  rows = []
  for run, result in table_rows(summary):
    cells = [format_cell(result, key, fmt, is_accuracy) for key, _, fmt, is_accuracy in _COLUMNS]
    rows.append(f"| {run} | {result.get('method', '')} | {result.get('student', '')} | "
                + " | ".join(cells) + " |")
  return "\n".join([header, rule] + rows) + "\n"


def _run_dirs(workdir: str, run: str, result: dict) -> list:
  if "seeds" in result:
    return [os.path.join(workdir, run, f"seed{seed}") for seed in result["seeds"]]
  return [os.path.join(workdir, run)]


def _mean_curve(line_sets, key: str):
  """(steps, mean over runs) of `key`, at the steps every run logged."""
  by_step = {}
  for lines in line_sets:
    for line in lines:
      by_step.setdefault(line["step"], []).append(line[key])
  steps = sorted(s for s, values in by_step.items() if len(values) == len(line_sets))
  return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot_results(summary: dict, workdir: str, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = table_rows(summary)
  figure, (bars, train, evals) = plt.subplots(1, 3, figsize=(15, 4))
  names = [name for name, _ in rows]
  accuracies = [result["eval_accuracy"] for _, result in rows]
  errors = [result.get("std", {}).get("eval_accuracy", 0.0) for _, result in rows]
  bars.bar(names, accuracies, yerr=errors, capsize=3, color="tab:blue")
  bars.set_ylim(max(0.0, min(accuracies) - 0.1), min(1.0, max(accuracies) + 0.05))
  for i, value in enumerate(accuracies):
    bars.text(i, value, f"{value:.3f}", ha="center", va="bottom")
  bars.set_title("eval accuracy (mean ± std over seeds)")
  plt.setp(bars.get_xticklabels(), rotation=30, ha="right")
  for run, result in summary["runs"].items():
    line_sets = [read_metrics(d) for d in _run_dirs(workdir, run, result)]
    train_curve = _mean_curve([[l for l in s if l["split"] == "train"] for s in line_sets], "loss")
    eval_curve = _mean_curve([[l for l in s if l["split"] == "eval"] for s in line_sets],
                             "accuracy")
    train.plot(*train_curve, label=run)
    evals.plot(*eval_curve, "o-", label=run)
  train.set(title="train loss (mean over seeds)", xlabel="step", yscale="log")
  evals.set(title="eval accuracy (mean over seeds)", xlabel="step")
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
