"""The diffusion part of a report, for rows whose summary has sample quality (`eval_fd`, from a
diffusion method's `final_metrics`, `kdjax/diffusion/quality.py`):

  * a markdown table, one line per (row, NFE): the student's FD (mean ± std over seeds),
    the teacher's best FD at the same NFE (Euler / Heun / DDIM, which one), whether the student
    is lower, precision, recall, class coverage and the distance to the teacher's ODE solution;
    then the teacher's full 35-NFE solve;
  * `diffusion_fd.png`: FD against NFE (log scale), the teacher's curve (best sampler per NFE,
    and its full solve) and each student's points with their std as error bars;
  * `diffusion_samples.png`: a grid of samples, one line per row (its first seed, its first
    sampler setting) under the teacher's full solve, all from the same fixed noise (one digit
    class per column).

`write_diffusion_report(rows, out)` writes both figures and returns the table's markdown.
"""

import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

_NFE_KEY = re.compile(r"^eval_fd_nfe(\d+)$")
GRID_SAMPLES = 20  # Two of each class.


def has_diffusion(rows: Sequence) -> bool:
  """True when some row carries diffusion sample quality."""
  return any("eval_fd" in row.result and "eval_teacher_full_fd" in row.result for row in rows)


def _nfes(result: dict) -> List[int]:
  return sorted(int(m.group(1)) for m in map(_NFE_KEY.match, result) if m)


def _cell(result: dict, key: str, fmt: str = "{:.2f}") -> str:
  value = result.get(key)
  if value is None:
    return "–"
  std = result.get("std", {}).get(key)
  if "num_seeds" in result and std is not None:
    return f"{fmt.format(value)} ± {fmt.format(std)}"
  return fmt.format(value)


def diffusion_table(rows: Sequence) -> str:
  """The markdown table described in the module docstring."""
  lines = ["| run | NFE | student FD | teacher FD (same NFE) | lower | precision | recall "
           "| coverage | distance to teacher ODE |",
           "|" + " --- |" * 9]
  full = None
  for row in rows:
    result = row.result
    if "eval_teacher_full_fd" not in result:
      continue
    full = full or result
    for nfe in _nfes(result):
      student, teacher = result[f"eval_fd_nfe{nfe}"], result[f"eval_teacher_fd_nfe{nfe}"]
      lines.append(
          f"| {row.name} | {nfe} | {_cell(result, f'eval_fd_nfe{nfe}')} | {teacher:.2f} "
          f"({result.get(f'teacher_sampler_nfe{nfe}', '?')}) | "
          f"{'yes' if student < teacher else 'no'} | "
          f"{_cell(result, f'eval_precision_nfe{nfe}', '{:.3f}')} | "
          f"{_cell(result, f'eval_recall_nfe{nfe}', '{:.3f}')} | "
          f"{_cell(result, f'eval_class_coverage_nfe{nfe}', '{:.1f}')} | "
          f"{_cell(result, f'eval_teacher_distance_nfe{nfe}', '{:.3f}')} |")
  if full is not None:
    lines.append(f"| teacher (Heun, full) | {full['eval_teacher_full_nfe']} | – | "
                 f"{full['eval_teacher_full_fd']:.2f} | | | | | |")
  samples = next((r.result.get("eval_samples") for r in rows if "eval_samples" in r.result), "?")
  return (f"\n## Sample quality ({samples} samples from fixed noise; FD in the shipped digit "
          "classifier's embedding)\n\n" + "\n".join(lines) + "\n")


def _teacher_curve(rows: Sequence) -> Tuple[List[int], List[float]]:
  points: Dict[int, float] = {}
  for row in rows:
    for nfe in _nfes(row.result):
      points[nfe] = row.result[f"eval_teacher_fd_nfe{nfe}"]
    if "eval_teacher_full_fd" in row.result:
      points[int(row.result["eval_teacher_full_nfe"])] = row.result["eval_teacher_full_fd"]
  nfes = sorted(points)
  return nfes, [points[n] for n in nfes]


def plot_fd_vs_nfe(rows: Sequence, path: str) -> None:
  """FD against NFE: the teacher's curve and each row's points (± std over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  nfes, fds = _teacher_curve(rows)
  ax.plot(nfes, fds, "k--o", label="teacher (best of Euler/Heun/DDIM; Heun 35 NFE)")
  for row in rows:
    own = _nfes(row.result)
    if not own:
      continue
    std = row.result.get("std", {})
    ax.errorbar(own, [row.result[f"eval_fd_nfe{n}"] for n in own],
                yerr=[std.get(f"eval_fd_nfe{n}", 0.0) for n in own], fmt="o-", capsize=3,
                label=row.name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("network evaluations per sample (NFE)")
  ax.set_ylabel("FD (classifier embedding)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _row_samples(row) -> Tuple[str, np.ndarray]:
  """(label, images [GRID_SAMPLES, 8, 8, 1]) of a row's first run at its first setting."""
  from kdjax.diffusion import quality  # pylint: disable=g-import-not-at-top
  from kdjax.methods.registry import build_method  # pylint: disable=g-import-not-at-top
  from kdjax.train.load import load_run  # pylint: disable=g-import-not-at-top
  loaded = load_run(row.directories[0])
  sampler, steps = build_method(loaded.config).sampling()[0]
  images = quality.generate(loaded.apply_fn, loaded.variables, sampler=sampler,
                            num_steps=steps, num_samples=GRID_SAMPLES)
  return f"{row.name} ({sampler} {steps})", images


def plot_samples(rows: Sequence, path: str) -> None:
  """The sample grid: the teacher's full solve, then one line per row, same noise."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from kdjax.diffusion import quality  # pylint: disable=g-import-not-at-top
  lines = [("teacher (heun 18, 35 NFE)", quality.teacher_solution(GRID_SAMPLES))]
  lines += [_row_samples(row) for row in rows if row.directories and "eval_fd" in row.result]
  fig, axes = plt.subplots(len(lines), 1, figsize=(GRID_SAMPLES * 0.45, 0.75 * len(lines)),
                           squeeze=False)
  for ax, (label, images) in zip(axes[:, 0], lines):
    strip = np.concatenate(list(np.clip(images[..., 0], -1, 1)), axis=1)  # [8, 8·N]
    ax.imshow(strip, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_diffusion_report(rows: Sequence, out: str) -> str:
  """Writes diffusion_fd.png and diffusion_samples.png into `out`; returns the table."""
  plot_fd_vs_nfe(rows, os.path.join(out, "diffusion_fd.png"))
  plot_samples(rows, os.path.join(out, "diffusion_samples.png"))
  return diffusion_table(rows)
