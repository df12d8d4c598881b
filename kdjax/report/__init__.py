"""A suite's report: `results.md`, `results.csv` and `results.png` (`tables.py`, `plots.py`).

    from kdjax import report
    table = report.write_report(summary, workdir)   # what experiments.main writes at the end
"""

from kdjax.report.tables import (CSV_KEYS, LM_CSV_KEYS, ReportError, Row, csv_table,
                                 format_cell, is_language_model_report, load_workdir,
                                 markdown_table, results_table, summary_rows, table_rows,
                                 workdir_rows, write_report, write_rows_report)

REPORT_FILES = ("results.md", "results.csv", "results.png")

__all__ = ["CSV_KEYS", "LM_CSV_KEYS", "REPORT_FILES", "ReportError", "Row", "csv_table",
           "format_cell", "is_language_model_report", "load_workdir", "markdown_table",
           "results_table", "summary_rows", "table_rows", "workdir_rows", "write_report",
           "write_rows_report"]
