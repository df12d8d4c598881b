"""Rewrites a suite's report, or compares several workdirs in one table and one figure.

    python -m experiments.report --workdir=runs/quickstart
    python -m experiments.report --workdir=runs/a --workdir=runs/b --out=runs/compare

`experiments.main` (and `kdjax.train.run_suite`) write the report of their workdir when a
suite ends; the tables and the figure are `kdjax.report`'s (`results.md`, `results.csv`,
`results.png`). With several workdirs the rows are named `<workdir>/<row>` and `--out` is
required. A workdir is a suite's (with `summary.json`) or a single run's directory (with
`run_summary.json`).
"""

# The report's functions live in kdjax (run_suite writes the same files); re-exported here for
# scripts and notebooks that import them from experiments.report.
from kdjax.report.tables import (CSV_KEYS, LM_CSV_KEYS, ReportError, Row, csv_table,  # pylint: disable=unused-import
                                 format_cell, is_language_model_report, load_workdir,
                                 markdown_table, results_table, summary_rows, table_rows,
                                 workdir_rows, write_report, write_rows_report)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import cli  # pylint: disable=g-import-not-at-top
  from kdjax import paths  # pylint: disable=g-import-not-at-top
  workdirs = [paths.resolve(w) for w in flags.FLAGS.workdir or []]
  if not workdirs:
    cli.fail("--workdir is required: the directory of a finished experiments.main run "
             "(repeat --workdir to compare several).")
  out = paths.resolve(flags.FLAGS.out) if flags.FLAGS.out else None
  if out is None and len(workdirs) > 1:
    cli.fail(f"--out is required with {len(workdirs)} workdirs: the directory for the "
             "combined results.md, results.csv and results.png.")
  try:
    rows = workdir_rows(workdirs)
    table = write_rows_report(rows, out or workdirs[0],
                              title="Results" if len(workdirs) == 1 else
                              "Results of " + ", ".join(workdirs))
  except ReportError as error:
    cli.fail(str(error))
  except OSError as error:
    cli.fail(f"--out={out or workdirs[0]}: cannot write the report there ({error.strerror}).")
  print(table + f"\nReport in {out or workdirs[0]}/ (results.md, results.csv, results.png)")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_multi_string("workdir", None, "A suite's workdir (experiments.main --workdir), "
                            "or a run's directory; repeat to compare several.")
  flags.DEFINE_string("out", None, "Where to write results.md / .csv / .png; default: the "
                      "workdir (required with several).")


if __name__ == "__main__":
  from experiments import cli as _cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  _cli.run(main, config_name=None)
