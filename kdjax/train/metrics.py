"""Metric logging: JSON lines (always) and TensorBoard event files (tensorboardX, no TF)."""

import json
import os
import time
from typing import Dict, Optional

from kdjax.train import files


class MetricWriter:
  """Appends `{'step': int, 'split': str, **scalars}` lines to `metrics.jsonl` and writes the
  same scalars as TensorBoard events under `tensorboard/`. Only process 0 writes."""

  def __init__(self, directory: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(directory, "metrics.jsonl")
    self._tensorboard = None
    if enabled:
      os.makedirs(directory, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tensorboard = SummaryWriter(os.path.join(directory, "tensorboard"))
      except ImportError:  # TensorBoard output is optional; JSON lines always exist.
        self._tensorboard = None

  def write(self, step: int, split: str, scalars: Dict[str, float]):
    if not self.enabled:
      return
    try:
      with files.open_append(self.path) as f:  # Never through a planted link.
        f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
        f.flush()
      if self._tensorboard is not None:
        for name, value in scalars.items():
          self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        self._tensorboard.flush()
    except OSError as error:
      if files.is_disk_full(error):
        raise files.DiskFullError(self.path, "free space and rerun the same command to "
                                    "continue from the last checkpoint") from None
      raise

  def truncate_after(self, step: int, *, keep_evaluations: bool = True):
    """Drops lines logged after `step` (written before a crash, redone after resuming), and a
    half-written last line (a kill during a write). `keep_evaluations=False` also drops the
    evaluations logged at `step` itself: a run restored at its last step (its summary lost)
    evaluates again, and must not log the final evaluation twice."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = [line for line in _read_lines(self.path) if line["step"] < step or (
        line["step"] == step and (keep_evaluations or line["split"] == "train"))]
    files.write_atomic(self.path, "".join(json.dumps(line) + "\n" for line in kept))

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()


def _read_lines(path: str):
  """The records of a metrics.jsonl file. A last line that does not parse is one a kill cut
  short and is dropped (the rerun logs it again); any other line that does not parse is
  damage: DamagedFileError naming the file and line."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line.decode("utf-8"))
      if not isinstance(record, dict) or "step" not in record or "split" not in record:
        raise ValueError("not a {'step', 'split', ...} record")
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
      if number == len(lines):  # No newline after it: the write was cut short.
        continue
      raise files.damaged(path, f"line {number}: {str(error)[:80]}",
                          "delete the run directory to train it again (deleting only this "
                          "file keeps the run but loses its earlier metrics)") from None
    records.append(record)
  return records


def read_metrics(directory: str):
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return _read_lines(path)


class Progress:
  """Prints `run: step i/n loss .. ex/s .. ETA ..` lines while training."""

  def __init__(self, name: str, total_steps: int, start_step: int, *, enabled: bool = True):
    self.name, self.total, self.enabled = name, total_steps, enabled
    self.start_step, self.start_time = start_step, None

  def update(self, step: int, scalars: Dict[str, float], examples_per_sec: Optional[float]):
    if not self.enabled:
      return
    now = time.perf_counter()
    if self.start_time is None:
      self.start_time, self.start_step = now, step
    done = step - self.start_step
    eta = (now - self.start_time) / done * (self.total - step) if done > 0 else float("nan")
    rate = f"{examples_per_sec:,.0f} ex/s" if examples_per_sec else "compiling"
    shown = " ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k in ("loss", "accuracy"))
    eta_text = f"{eta:5.1f}s" if eta == eta else "  ?"
    print(f"[{self.name}] step {step}/{self.total} {shown} {rate} ETA {eta_text}", flush=True)


def format_duration(seconds: float) -> str:
  """'12.3s', '4m 05s', '1h 02m'."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes}m {secs:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h {minutes:02d}m"


# The metric a finished run is announced with: the first of these its summary holds.
HEADLINE_METRICS = (("eval_fd", "eval FD", "{:.2f}"),
                    ("eval_perplexity", "eval perplexity", "{:.2f}"),
                    ("eval_accuracy", "eval accuracy", "{:.4f}"))


def headline(summary: dict) -> str:
  for key, label, form in HEADLINE_METRICS:
    if isinstance(summary.get(key), (int, float)):
      return f"{label} {form.format(summary[key])}"
  return "done"


class SuiteProgress:
  """Prints a suite's place before each run, `[3/10] kd (suite 2m 10s, about 5m 40s left)`,
  and its headline eval metric after it, `[3/10] kd: eval accuracy 0.8060 in 1m 02s`.
  What is left is the mean time of the runs trained so far times the runs to go (runs found
  finished in the workdir are not counted: they take no time)."""

  def __init__(self, total: int, *, enabled: bool = True):
    self.total, self.enabled = total, enabled
    self.start_time = time.perf_counter()
    self.trained_seconds = []
    self.run_start = None

  def _place(self, index: int, name: str) -> str:
    return f"[{index}/{self.total}] {name}"

  def start(self, index: int, name: str, *, finished_before: bool) -> None:
    self.run_start = time.perf_counter()
    if not self.enabled or finished_before:
      return
    elapsed = format_duration(self.run_start - self.start_time)
    if self.trained_seconds:
      left = (sum(self.trained_seconds) / len(self.trained_seconds) *
              (self.total - index + 1))
      estimate = f", about {format_duration(left)} left"
    else:
      estimate = ""
    print(f"{self._place(index, name)} (suite {elapsed}{estimate})", flush=True)

  def finish(self, index: int, name: str, summary: dict, *, finished_before: bool) -> None:
    seconds = time.perf_counter() - self.run_start
    if not finished_before:
      self.trained_seconds.append(seconds)
    if not self.enabled or finished_before:  # The run said so itself ("finished earlier").
      return
    print(f"{self._place(index, name)}: {headline(summary)} in {format_duration(seconds)}",
          flush=True)
