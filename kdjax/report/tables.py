"""Reports of suites: `results.md` and `results.csv` (tables) and `results.png` (plots).

`write_report(summary, workdir)` writes the three files of a suite that just ended (what
`experiments.main` and `kdjax.train.run_suite` do); `write_rows_report(workdir_rows([...]),
out)` those of one or several finished workdirs (`python -m experiments.report`), their rows
named `<workdir>/<row>`. A workdir is a suite's (with `summary.json`) or a single run's
directory (with `run_summary.json`).

A row run over several seeds (`config.seeds`, see `kdjax/train/suite.py`) holds the mean of
its seeds under the usual keys, their standard deviation in `std` and their count in
`num_seeds`: the markdown table shows its accuracy columns as `mean ± std (n)`, the CSV has a
`<key>_std` column beside each number, and the plots show the mean with the standard deviation
as error bars or bands. Ensembles (`summary['ensembles']`, the born-again generations) are
extra rows of the tables and bars of the plot. The figure is drawn by `plots.py`.
"""

import csv
import dataclasses
import io
import math
import os
from typing import List, Sequence

from kdjax.train import files

# (summary key, column title, format, is an accuracy: shown as mean ± std (n) over seeds).
_COLUMNS = (("eval_accuracy", "eval acc (last)", "{:.4f}", True),
            ("best_eval_accuracy", "eval acc (best)", "{:.4f}", True),
            ("teacher_agreement", "teacher agreement", "{:.4f}", True),
            ("final_train_loss", "final train loss", "{:.4f}", False),
            ("steps", "steps", "{}", False),
            ("train_examples_per_sec", "train ex/s", "{:,.0f}", False))

# Language-model rows (their summary has `eval_perplexity`) show what LLM people compare
# instead of top-1 accuracy: perplexity, agreement with the teacher, the teacher-forced
# acceptance probability sum_v min(p, q) on the eval text, and the acceptance rates of real
# speculative decoding with the student as draft (`kdjax/lm/evaluation.py`).
_LM_COLUMNS = (("eval_perplexity", "eval ppl", "{:.2f}", True),
               ("teacher_agreement", "teacher agreement", "{:.3f}", True),
               ("eval_teacher_overlap", "overlap sum min(p,q)", "{:.3f}", True),
               ("spec_greedy_acceptance_rate", "acceptance greedy", "{:.3f}", True),
               ("spec_sampled_acceptance_rate", "acceptance sampled", "{:.3f}", True),
               ("final_train_loss", "final train loss", "{:.4f}", False),
               ("steps", "steps", "{}", False),
               ("train_examples_per_sec", "train sequences/s", "{:,.1f}", False))

# The numbers of the CSV table, each followed by its `_std` column.
CSV_KEYS = ("eval_accuracy", "best_eval_accuracy", "best_eval_step", "teacher_agreement",
            "eval_cross_entropy", "final_train_loss", "steps", "train_examples_per_sec",
            "student_params")
LM_CSV_KEYS = ("eval_perplexity", "eval_teacher_overlap", "spec_greedy_acceptance_rate",
               "spec_sampled_acceptance_rate", "spec_greedy_implied_speedup",
               "spec_sampled_implied_speedup", "generation_tokens_per_sec",
               "teacher_eval_perplexity")

SUMMARY, RUN_SUMMARY = "summary.json", "run_summary.json"


class ReportError(ValueError):
  """A workdir the report cannot read; its message names the path and what is expected."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the report: a suite row (over its seeds) or an ensemble."""
  name: str
  result: dict
  directories: tuple  # The run directories holding its metrics.jsonl (none for ensembles).

  @property
  def is_ensemble(self) -> bool:
    return not self.directories


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


def _run_dirs(workdir: str, run: str, result: dict) -> tuple:
  if "seeds" in result:
    return tuple(os.path.join(workdir, run, f"seed{seed}") for seed in result["seeds"])
  return (os.path.join(workdir, run),)


def summary_rows(summary: dict, workdir: str = "", prefix: str = "") -> List[Row]:
  """The rows of one summary: its runs, then its ensembles, names prefixed by `prefix`."""
  rows = [Row(prefix + name, result, _run_dirs(workdir, name, result))
          for name, result in summary["runs"].items()]
  for name, result in summary.get("ensembles", {}).items():
    rows.append(Row(f"{prefix}{name} ensemble ({result.get('generations', '?')})", result, ()))
  return rows


def table_rows(summary: dict) -> list:
  """(name, result) of every row: the runs, then the ensembles."""
  return [(row.name, row.result) for row in summary_rows(summary)]


def is_language_model_report(rows: Sequence[Row]) -> bool:
  return any("eval_perplexity" in row.result for row in rows)


def markdown_table(rows: Sequence[Row]) -> str:
  """A markdown table with one line per row (language-model columns for LM suites)."""
  columns = _LM_COLUMNS if is_language_model_report(rows) else _COLUMNS
  header = "| run | method | model | " + " | ".join(c[1] for c in columns) + " |"
  rule = "|" + " --- |" * (3 + len(columns))
  lines = []
  for row in rows:
    cells = [format_cell(row.result, key, fmt, is_accuracy)
             for key, _, fmt, is_accuracy in columns]
    lines.append(f"| {row.name} | {row.result.get('method', '')} | "
                 f"{row.result.get('student', '')} | " + " | ".join(cells) + " |")
  return "\n".join([header, rule] + lines) + "\n"


def results_table(summary: dict) -> str:
  """The markdown table of one suite's summary."""
  return markdown_table(summary_rows(summary))


def csv_table(rows: Sequence[Row]) -> str:
  """The rows as CSV: run, method, model, num_seeds, then each of `CSV_KEYS` and its
  standard deviation over seeds (`<key>_std`, empty for a single run); empty cells for
  numbers a row does not have."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  keys = CSV_KEYS + (LM_CSV_KEYS if is_language_model_report(rows) else ())
  writer.writerow(["run", "method", "model", "num_seeds"] +
                  [name for key in keys for name in (key, f"{key}_std")])
  for row in rows:
    result, std = row.result, row.result.get("std", {})
    cells = [row.name, result.get("method", ""), result.get("student", ""),
             result.get("num_seeds", 1)]
    for key in keys:
      cells += ["" if _missing(result.get(key)) else repr(result[key]),
                "" if _missing(std.get(key)) else repr(std[key])]
    writer.writerow(cells)
  return out.getvalue()


def load_workdir(workdir: str) -> dict:
  """A workdir's summary: `summary.json` of a suite, or a one-row summary from a single run's
  `run_summary.json` (its row named after the directory). Raises ReportError otherwise."""
  if not os.path.isdir(workdir):
    raise ReportError(f"--workdir={workdir}: no such directory.")
  try:  # A damaged (empty, truncated) summary: one line naming it (files.DamagedFileError).
    if os.path.exists(os.path.join(workdir, SUMMARY)):
      summary = files.read_json(os.path.join(workdir, SUMMARY))
    elif os.path.exists(os.path.join(workdir, RUN_SUMMARY)):
      summary = {"runs": {"": files.read_json(os.path.join(workdir, RUN_SUMMARY))}}
    else:
      summary = None
  except files.DamagedFileError as error:
    raise ReportError(str(error)) from None
  if summary is None:
    raise ReportError(f"--workdir={workdir} holds no {SUMMARY} (a suite's) nor "
                      f"{RUN_SUMMARY} (a run's): give the --workdir of a finished "
                      "experiments.main run.")
  if not isinstance(summary, dict) or not summary.get("runs"):
    raise ReportError(f"--workdir={workdir}: its {SUMMARY} lists no finished runs yet.")
  return summary


def _labels(workdirs: Sequence[str]) -> List[str]:
  """Short distinct names of the workdirs: each its last path components, as few as tell it
  apart from the others ('a/suite' and 'b/suite', but 'one')."""
  parts = [os.path.normpath(w).split(os.sep) for w in workdirs]
  labels = []
  for i, mine in enumerate(parts):
    depth = 1
    while depth < len(mine) and any(other[-depth:] == mine[-depth:]
                                     for j, other in enumerate(parts) if j != i):
      depth += 1
    labels.append("/".join(mine[-depth:]))
  return labels


def workdir_rows(workdirs: Sequence[str]) -> List[Row]:
  """The rows of one or several workdirs; with several, each row name is `<workdir>/<row>`."""
  rows = []
  labels = _labels(workdirs)
  for workdir, label in zip(workdirs, labels):
    summary = load_workdir(workdir)
    if list(summary["runs"]) == [""]:  # A single run: the row is the workdir itself.
      result = summary["runs"][""]
      rows.append(Row(label, result, (workdir,)))
      continue
    rows += summary_rows(summary, workdir, prefix=f"{label}/" if len(workdirs) > 1 else "")
  return rows


def write_rows_report(rows: Sequence[Row], out: str, *, title: str = "Results") -> str:
  """Writes results.md, results.csv and results.png into `out`; returns the markdown table."""
  from kdjax.report import diffusion_plots, plots  # pylint: disable=g-import-not-at-top
  table = markdown_table(rows)
  if diffusion_plots.has_diffusion(rows):  # Sample quality: its table, FD-vs-NFE, samples.
    os.makedirs(out, exist_ok=True)
    table += diffusion_plots.write_diffusion_report(rows, out)
  os.makedirs(out, exist_ok=True)
  files.write_atomic(os.path.join(out, "results.md"), f"# {title}\n\n" + table)
  files.write_atomic(os.path.join(out, "results.csv"), csv_table(rows))
  plots.plot_report(rows, os.path.join(out, "results.png"),
                           language_model=is_language_model_report(rows))
  return table


def write_report(summary: dict, workdir: str) -> str:
  """The report of a suite that just ended, into its workdir; returns the markdown table."""
  return write_rows_report(summary_rows(summary, workdir), workdir)
