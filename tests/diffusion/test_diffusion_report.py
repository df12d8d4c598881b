"""The diffusion part of the report (`kdjax/report/diffusion_plots.py`) on hand-made rows."""

from kdjax.report import diffusion_plots
from kdjax.report.tables import Row


def _row(name, fds, teacher, seeds=False):
  result = {"eval_fd": fds[min(fds)], "eval_teacher_full_fd": 7.1, "eval_teacher_full_nfe": 35,
            "eval_samples": 1000}
  for nfe, fd in fds.items():
    result.update({f"eval_fd_nfe{nfe}": fd, f"eval_teacher_fd_nfe{nfe}": teacher[nfe],
                   f"teacher_sampler_nfe{nfe}": f"ddim{nfe}", f"eval_precision_nfe{nfe}": 0.9,
                   f"eval_recall_nfe{nfe}": 0.5, f"eval_class_coverage_nfe{nfe}": 1.0,
                   f"eval_teacher_distance_nfe{nfe}": 0.2})
  if seeds:
    result.update(num_seeds=3, std={f"eval_fd_nfe{n}": 1.5 for n in fds})
  return Row(name, result, ())


TEACHER = {1: 135.6, 2: 26.1, 4: 13.2}


def test_table_has_a_line_per_row_and_nfe_and_says_which_is_lower():
  rows = [_row("consistency", {1: 30.0, 2: 27.0, 4: 12.0}, TEACHER, seeds=True),
          _row("dmd", {1: 20.0}, TEACHER), Row("other", {"eval_accuracy": 0.9}, ())]
  assert diffusion_plots.has_diffusion(rows)
  assert not diffusion_plots.has_diffusion(rows[2:])
  table = diffusion_plots.diffusion_table(rows)
  assert "| consistency | 1 | 30.00 ± 1.50 | 135.60 (ddim1) | yes |" in table
  assert "| consistency | 2 | 27.00 ± 1.50 | 26.10 (ddim2) | no |" in table
  assert "| dmd | 1 | 20.00 | 135.60 (ddim1) | yes |" in table
  assert "| teacher (Heun, full) | 35 | – | 7.10 |" in table
  assert "1000 samples" in table
  assert diffusion_plots._teacher_curve(rows) == ([1, 2, 4, 35], [135.6, 26.1, 13.2, 7.1])


def test_fd_plot_is_written(tmp_path):
  rows = [_row("dmd", {1: 20.0}, TEACHER, seeds=True)]
  diffusion_plots.plot_fd_vs_nfe(rows, str(tmp_path / "fd.png"))
  assert (tmp_path / "fd.png").stat().st_size > 1000
