"""The report's figure, `results.png`: four panels over the rows of `kdjax.report.tables`.

1. Eval accuracy per row (the last evaluation), mean ± std over seeds as error bars, with
   the scratch student's accuracy as a dashed reference line.
2. Teacher agreement (top-1, on the eval split) against eval accuracy, one point per
   distilled row, error bars both ways over seeds.
3. Training cross-entropy against step. Each method's total loss has its own scale (KD's T^2
   factor, feature terms weighted by 1 to 1000), so the curves show the CE term `ce` that
   every method logs; a run that logs no `ce` falls back to its total `loss` (marked so).
4. Eval accuracy against step.

A row has the same colour in every panel; teacher runs are dashed in the curves. When the
runs train for different numbers of steps (a teacher of 4000 steps, students of 2000), the
curves' axis is the fraction of each run's steps, so that every curve is shown whole and
none is squeezed; otherwise it is the step. The agreement panel places each name where it
overlaps no other name or point.

Language-model suites (rows with `eval_perplexity`) plot eval perplexity instead of accuracy
(panels 1 and 4; lower is better) and, in panel 2, the acceptance rate of sampled speculative
decoding with the student as draft against its eval perplexity.
"""

import dataclasses
import io
import math
from typing import Callable, List, Sequence, Tuple

import numpy as np

from kdjax.train import files
from kdjax.train.metrics import read_metrics


@dataclasses.dataclass(frozen=True)
class _Quality:
  """What the bars and the eval curves show: a summary key, and how an eval line of
  metrics.jsonl gives it."""
  key: str
  label: str
  from_eval_line: str  # The metrics.jsonl key it is computed from.
  transform: Callable[[float], float] = float


_ACCURACY = _Quality("eval_accuracy", "eval accuracy", "accuracy")
_PERPLEXITY = _Quality("eval_perplexity", "eval perplexity (lower is better)", "cross_entropy",
                       math.exp)


def _quality(language_model: bool) -> _Quality:
  return _PERPLEXITY if language_model else _ACCURACY


def _is_teacher(row) -> bool:
  return row.name.split("/")[-1].startswith("teacher")


def mean_curve(line_sets: Sequence[Sequence[dict]], key: str) -> Tuple[list, list, list]:
  """(steps, mean, std) of `key` over runs (ddof 1; 0 for one run), at the steps every run
  logged it."""
  by_step = {}
  for lines in line_sets:
    for line in lines:
      if key in line:
        by_step.setdefault(line["step"], []).append(line[key])
  steps = sorted(s for s, values in by_step.items() if len(values) == len(line_sets))
  means = [float(np.mean(by_step[s])) for s in steps]
  stds = [float(np.std(by_step[s], ddof=1)) if len(line_sets) > 1 else 0.0 for s in steps]
  return steps, means, stds


def row_curves(row, quality: _Quality = _ACCURACY) -> dict:
  """{'train': (steps, mean, std, key), 'eval': (steps, mean, std)} of a row over its seeds;
  the train key is 'ce' when every run logs it, else 'loss'; the eval curve is `quality`
  (accuracy, or perplexity for language models)."""
  line_sets = [read_metrics(d) for d in row.directories]
  train = [[l for l in lines if l["split"] == "train"] for lines in line_sets]
  evals = [[dict(l, quality=quality.transform(l[quality.from_eval_line])) for l in lines
            if l["split"] == "eval" and quality.from_eval_line in l] for lines in line_sets]
  key = "ce" if all(any("ce" in l for l in lines) for lines in train) else "loss"
  return {"train": mean_curve(train, key) + (key,), "eval": mean_curve(evals, "quality")}


def _colors(count: int) -> List:
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(count)]


def _over_seeds(rows) -> str:
  """A title's note on what a point is: the mean ± std over seeds, where some row has seeds."""
  return ", mean ± std over seeds" if any(r.result.get("num_seeds", 1) > 1 for r in rows) else ""


def _bars(ax, rows, colors, quality: _Quality = _ACCURACY):
  names = [row.name for row in rows]
  accuracies = [row.result.get(quality.key) or 0.0 for row in rows]
  errors = [row.result.get("std", {}).get(quality.key, 0.0) for row in rows]
  positions = np.arange(len(rows))
  ax.bar(positions, accuracies, yerr=errors if any(errors) else None, capsize=3, color=colors,
         hatch=["//" if _is_teacher(r) else ".." if r.is_ensemble else "" for r in rows],
         edgecolor="white")  # Teachers and ensembles are not students: marked apart.
  scratch = [a for row, a in zip(rows, accuracies) if row.name.split("/")[-1] == "scratch"]
  if len(scratch) == 1:
    ax.axhline(scratch[0], color="gray", linestyle="--", linewidth=1, label="scratch")
  shown = [a for a in accuracies if a > 0]
  low = min(shown, default=0.0)
  if quality is _ACCURACY:
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(accuracies, default=1.0) + 0.06))
  else:  # Perplexity: from 0, a little room above the highest bar and its error bar.
    ax.set_ylim(0.0, max((a + e for a, e in zip(accuracies, errors)), default=1.0) * 1.1)
  for x, value, error in zip(positions, accuracies, errors):
    ax.text(x, value + error, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(positions, names, rotation=35, ha="right", fontsize=9)
  ax.set(title=f"{quality.label} (last eval{_over_seeds(rows)})", ylabel=quality.label)


# Candidate label offsets from the point, in points (right-above first, then around it).
_LABEL_OFFSETS = ((4, 4), (4, -11), (-4, 4), (-4, -11), (4, 13), (4, -20), (-4, 13), (-4, -20),
                  (4, 22), (4, -29), (-4, 22), (-4, -29))


def _overlaps(box, boxes) -> bool:
  x0, y0, x1, y1 = box
  return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes)


def place_labels(ax, names, xy, *, fontsize: float = 8) -> list:
  """Annotates each point `xy[i]` with `names[i]` at the first offset (`_LABEL_OFFSETS`) whose
  text box overlaps no label placed before it nor any point; returns the annotations. Boxes
  are estimated in display pixels from the axes' data transform (0.6 em a character)."""
  ax.autoscale_view()
  to_pixels = ax.transData.transform
  scale = ax.figure.dpi / 72.0
  height = 1.2 * fontsize * scale
  points = [to_pixels(p) for p in xy]
  taken = [(x - 4, y - 4, x + 4, y + 4) for x, y in points]  # The markers.
  annotations = []
  order = sorted(range(len(names)), key=lambda i: (-xy[i][1], xy[i][0]))  # Top-left first.
  for i in order:
    (x, y), width = points[i], 0.6 * fontsize * scale * len(names[i])
    chosen = _LABEL_OFFSETS[0]
    for dx, dy in _LABEL_OFFSETS:
      left = x + dx * scale if dx >= 0 else x + dx * scale - width
      box = (left, y + dy * scale, left + width, y + dy * scale + height)
      if not _overlaps(box, taken):
        chosen = (dx, dy)
        break
    dx, dy = chosen
    left = x + dx * scale if dx >= 0 else x + dx * scale - width
    taken.append((left, y + dy * scale, left + width, y + dy * scale + height))
    annotations.append(ax.annotate(names[i], xy[i], textcoords="offset points", xytext=(dx, dy),
                                   ha="left" if dx >= 0 else "right", va="bottom",
                                   fontsize=fontsize))
  return annotations


def _scatter(ax, rows, colors, quality: _Quality = _ACCURACY):
  if quality is _ACCURACY:
    x_key, y_key = "teacher_agreement", "eval_accuracy"
    title, x_label, y_label = ("teacher agreement vs eval accuracy", "top-1 agreement with the "
                               "teacher", "eval accuracy")
  else:
    x_key, y_key = "eval_perplexity", "spec_sampled_acceptance_rate"
    title, x_label, y_label = ("speculative acceptance vs perplexity", "eval perplexity",
                               "acceptance rate as the teacher's draft (sampled)")
  points = [(row, color) for row, color in zip(rows, colors)
            if row.result.get(x_key) is not None and row.result.get(y_key) is not None]
  xy = [(r.result[x_key], r.result[y_key]) for r, _ in points]
  for (row, color), (x, y) in zip(points, xy):
    std = row.result.get("std", {})
    ax.errorbar(x, y, xerr=std.get(x_key, 0.0) or None,
                yerr=std.get(y_key, 0.0) or None, fmt="o", color=color, capsize=3)
  if not points:
    ax.text(0.5, 0.5, "no distilled rows", ha="center", va="center", transform=ax.transAxes)
  ax.set(title=f"{title}{_over_seeds(rows)}", xlabel=x_label, ylabel=y_label)
  if len(points) > 12:  # The names would cover the points; the legend has the colours.
    return [], []
  ax.margins(0.15)  # Room for the names at the edges.
  return [row.name for row, _ in points], xy


def step_counts(lengths: dict) -> str:
  """{'teacher': 4000, 'kd': 2000, 'crd': 2000} -> 'teacher 4,000; the other runs 2,000'."""
  groups = {}
  for name, steps in lengths.items():
    groups.setdefault(steps, []).append(name)
  most = max(groups, key=lambda steps: len(groups[steps]))
  parts = [f"{', '.join(names)} {steps:,}" for steps, names in groups.items() if steps != most]
  return "; ".join(parts + [f"the other runs {most:,}"])


def _curves(train_ax, eval_ax, rows, colors, quality: _Quality = _ACCURACY):
  runs = [(row, color, row_curves(row, quality)) for row, color in zip(rows, colors)
          if not row.is_ensemble]
  # Each run's length: its last logged step. Runs of different lengths are drawn against the
  # fraction of their own steps, so a longer teacher is not cut and the students not squeezed.
  lengths = {row.name: max(curves["train"][0] + curves["eval"][0] or [1])
             for row, _, curves in runs}
  by_fraction = len(set(lengths.values())) > 1
  train_keys = set()
  for row, color, curves in runs:
    style = "--" if _is_teacher(row) else "-"
    scale = 1.0 / lengths[row.name] if by_fraction else 1.0
    steps, mean, std, key = curves["train"]
    train_keys.add(key)
    label = row.name if key == "ce" else f"{row.name} (total loss)"
    x = np.asarray(steps, float) * scale
    train_ax.plot(x, mean, style, color=color, label=label)
    train_ax.fill_between(x, np.subtract(mean, std), np.add(mean, std), color=color,
                          alpha=0.15, linewidth=0)
    steps, mean, std = curves["eval"]
    eval_ax.errorbar(np.asarray(steps, float) * scale, mean, yerr=std, fmt="o" + style,
                     color=color, markersize=3, capsize=2, label=row.name)
  if by_fraction:
    x_label = "fraction of the run's steps"
    eval_ax.text(0.0, -0.16, "steps: " + step_counts(lengths), transform=eval_ax.transAxes,
                 fontsize=8, va="top")
  else:
    x_label = "step"
  what = "cross-entropy (the ce term)" if train_keys == {"ce"} else "cross-entropy or total loss"
  train_ax.set(title=f"training {what}{_over_seeds(rows)}", xlabel=x_label, yscale="log")
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  # Ticks at 1, 2, 5 x 10^k written as 0.2, 0.5, 1, 2: matplotlib's default labels every
  # minor tick of a short log axis as 2 x 10^-1, 3 x 10^-1, ...
  train_ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  train_ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
  train_ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  eval_ax.set(title=f"{quality.label}{_over_seeds(rows)}", xlabel=x_label, ylabel=quality.label)


def draw_figure(rows, *, language_model: bool = False):
  """The four panels for `rows` (`kdjax.report.tables.Row`) as a matplotlib figure;
  `language_model` plots perplexity instead of accuracy."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colors, quality = _colors(len(rows)), _quality(language_model)
  figure, axes = plt.subplots(2, 2, figsize=(15, 10), dpi=100)
  _bars(axes[0, 0], rows, colors, quality)
  _curves(axes[1, 0], axes[1, 1], rows, colors, quality)
  names, xy = _scatter(axes[0, 1], rows, colors, quality)
  handles, labels = axes[1, 1].get_legend_handles_labels()
  figure.legend(handles, labels, loc="center right", fontsize=9, title="run")
  figure.tight_layout(rect=(0, 0, 0.89, 1))
  place_labels(axes[0, 1], names, xy)  # After the layout: it places them in display pixels.
  return figure


def plot_report(rows, path: str, *, language_model: bool = False):
  """Draws the four panels for `rows` and saves them to `path` (PNG)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure = draw_figure(rows, language_model=language_model)
  # Rendered in memory, then written through a temporary file and a rename: a kill or a full
  # disk never leaves a truncated results.png, and a symbolic link there is not followed.
  image = io.BytesIO()
  figure.savefig(image, format="png", dpi=100)
  plt.close(figure)
  files.write_atomic(path, image.getvalue())
