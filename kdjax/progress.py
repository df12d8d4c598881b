"""One progress line per long phase outside the train loop (a teacher-logit pass, cache
writing, dataset generation): `[teacher logits] 1,024/4,000 windows 12.3s ETA 35.9s`.

At most one line every `every_seconds` and one at the end, so a fast phase says nothing but
its end and a slow one shows it is moving; `enabled=False` (config.progress) prints nothing.
"""

import time


class PhaseProgress:
  """Counts `update(done)` calls towards `total` units and prints the elapsed time and ETA."""

  def __init__(self, label: str, total: int, unit: str, *, enabled: bool = True,
               every_seconds: float = 5.0):
    self.label, self.total, self.unit = label, total, unit
    self.enabled = enabled and total > 0
    self.every = every_seconds
    self.start = self.last = time.perf_counter()

  def update(self, done: int) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if done < self.total and now - self.last < self.every:
      return
    self.last = now
    elapsed = now - self.start
    eta = elapsed / done * (self.total - done) if done else float("nan")
    eta_text = f" ETA {eta:.1f}s" if done < self.total and eta == eta else ""
    print(f"[{self.label}] {done:,}/{self.total:,} {self.unit} {elapsed:.1f}s{eta_text}",
          flush=True)
