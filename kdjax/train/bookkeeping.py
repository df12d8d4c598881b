"""The loop's bookkeeping, each piece with one job: when to log / evaluate / save, the
metrics window, and the training throughput."""

import time
from typing import Callable, Dict, List, Optional

import jax
import numpy as np

from kdjax.train import parallel as parallel_lib


def itstime(step: int, every: int, total: int) -> bool:
  """True every `every` steps and at the last step (big_vision's `u.itstime`)."""
  return step % every == 0 or step == total


def call_length(step: int, total: int, steps_per_call: int) -> int:
  """Steps in the train-step call that starts at `step`: calls end on multiples of
  `steps_per_call` (so a run resumed between two boundaries realigns) or at `total`."""
  return min(steps_per_call - step % steps_per_call, total - step)


def mean_window(window: List[Dict[str, float]]) -> Dict[str, float]:
  """Means over the logged steps; skipped non-finite steps are counted, not averaged in."""
  out = {}
  for key in window[0]:
    values = np.array([metrics[key] for metrics in window], np.float64)
    if key == "skipped_nonfinite":
      out[key] = float(values.sum())
    else:
      finite = values[np.isfinite(values)]
      out[key] = float(finite.mean()) if finite.size else float("nan")
  return out


class MetricsWindow:
  """Step metrics since the last log line. Device metrics wait in `pending` (copying each
  step's to the host would stall the device) until `flush`, which checks them for non-finite
  loss or gradients; `window` (host floats) is saved in checkpoints so that a resumed run
  logs the same lines."""

  def __init__(self, parallel, window=(), skipped_steps: int = 0):
    self.parallel = parallel
    self.window = list(window)
    self.skipped_steps = skipped_steps
    self.pending = []

  def add(self, step: int, device_metrics, num_steps: int = 1):
    """The metrics of the step that ends at `step`; with `num_steps` > 1, of the steps
    step - num_steps + 1 .. step, stacked on a leading axis (`parallel.repeat_step`)."""
    self.pending.append((step, device_metrics, num_steps))

  def _host_steps(self):
    """(step, host metrics) of every pending step, in order."""
    for step, device_metrics, num_steps in self.pending:
      if num_steps == 1:
        yield step, parallel_lib.metrics_to_host(self.parallel, device_metrics)
        continue
      stacked = {k: np.asarray(v) for k, v in jax.device_get(device_metrics).items()}
      for i in range(num_steps):
        yield step - num_steps + 1 + i, {k: float(v[i]) for k, v in stacked.items()}

  def flush(self, on_nonfinite: Optional[Callable[[int, List[str], dict], None]]):
    """Copies pending metrics to the host; calls `on_nonfinite(step, bad_keys, metrics)` for
    a step with a non-finite loss or gradient norm (it raises to stop the run)."""
    for step, host in self._host_steps():
      bad = [k for k in ("loss", "grad_norm") if not np.isfinite(host[k])]
      if bad and on_nonfinite is not None:
        on_nonfinite(step, bad, host)
      self.skipped_steps += int(host.get("skipped_nonfinite", 0))
      self.window.append(host)
    self.pending = []

  def take_mean(self) -> Dict[str, float]:
    scalars = mean_window(self.window)
    self.window = []
    return scalars


class Throughput:
  """Training examples per second. The first interval (compilation) and the time spent
  evaluating or checkpointing (`exclude_since_mark`) are not counted."""

  def __init__(self, global_batch_size: int, start_step: int):
    self.global_batch_size = global_batch_size
    self.steps, self.seconds = 0, 0.0
    self._last_time, self._last_step = None, start_step

  def mark(self, step: int):
    now = time.perf_counter()
    if self._last_time is not None:
      self.seconds += now - self._last_time
      self.steps += step - self._last_step
    self._last_time, self._last_step = now, step

  def exclude_since_mark(self):
    self._last_time = time.perf_counter()

  def restart(self, step: int):
    """Counts from `step` on, dropping the interval since the last mark (steps and time):
    after a call that compiled (a new call length mid-run)."""
    if self._last_time is not None:
      self._last_time, self._last_step = time.perf_counter(), step

  @property
  def examples_per_sec(self) -> Optional[float]:
    return self.steps * self.global_batch_size / self.seconds if self.seconds else None
