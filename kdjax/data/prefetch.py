"""Training batches prepared ahead by background threads, so the device never waits for them.

    with Prefetcher(pipeline.train_batch, put=parallel.put_batch, start=s, stop=n,
                    depth=2) as batches:
      for step in range(s, n):
        state, metrics = train_step(state, teacher_variables, batches.get(step))

While step `step` runs, batches `step+1 .. step+depth` are gathered, augmented and put on the
devices by worker threads (double buffering for depth 1; `put` is asynchronous in JAX, so the
host-to-device copy overlaps the step as well). The batches are the same as without prefetching:
batch `step` is `make_batch(step)`, a pure function of (seed, step), whichever thread computes
it and whenever, so a resumed run still sees exactly the batches of an uninterrupted one.

A worker's exception is raised by `get` for that step, in the caller's thread. Leaving the
`with` block (normally, on an error, or on `Preempted` after SIGTERM) cancels the batches not
yet started and waits for at most `workers` running ones: nothing hangs and the checkpoint the
loop writes before raising is not delayed by more than one batch's preparation.
"""

import concurrent.futures
from typing import Any, Callable, Dict

from kdjax import validation


class Prefetcher:
  """`get(step)` returns `put(make_batch(step))`, computed up to `depth` steps ahead.

  Args:
    make_batch: step -> host batch (numpy), a pure function of the step.
    put: host batch -> device batch (`parallel.put_batch`); identity by default.
    start / stop: the steps to serve, `start <= step < stop`, asked for in order.
    depth: batches prepared ahead of the one being consumed; 0 prepares each batch in `get`,
      in the caller's thread (no threads at all).
    workers: threads preparing batches; more than one helps pipelines whose work releases the
      GIL (JPEG decoding, PIL resizing) on hosts with cores to spare.
  """

  def __init__(self, make_batch: Callable[[int], Dict[str, Any]], *,
               put: Callable[[Dict[str, Any]], Any] = lambda batch: batch,
               start: int, stop: int, depth: int, workers: int = 1):
    validation.require(depth, validation.NON_NEGATIVE_INT, "Prefetcher depth (config.prefetch)")
    validation.require(workers, validation.POSITIVE_INT, "Prefetcher workers")
    self._make, self._put = make_batch, put
    self._next, self._stop, self._depth = start, stop, depth
    self._futures: Dict[int, concurrent.futures.Future] = {}
    self._executor = (concurrent.futures.ThreadPoolExecutor(
        max_workers=min(workers, depth), thread_name_prefix="kdjax-prefetch")
                      if depth else None)
    for step in range(start, min(start + depth, stop)):
      self._submit(step)

  def _prepare(self, step: int):
    return self._put(self._make(step))

  def _submit(self, step: int):
    self._futures[step] = self._executor.submit(self._prepare, step)

  def get(self, step: int):
    """The device batch of `step`; steps must be asked for in order, from `start`."""
    if step != self._next or step >= self._stop:
      raise ValueError(f"Prefetcher.get({step}): the next step served is {self._next} "
                       f"(steps in order, below {self._stop}).")
    self._next += 1
    if self._executor is None:
      return self._prepare(step)
    ahead = step + self._depth
    if ahead < self._stop:  # Keep `depth` batches in flight while this one is consumed.
      self._submit(ahead)
    return self._futures.pop(step).result()

  def close(self):
    """Cancels the batches not started; waits for the running ones (at most `workers`)."""
    if self._executor is not None:
      for future in self._futures.values():
        future.cancel()
      self._futures.clear()
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc_info):
    self.close()
