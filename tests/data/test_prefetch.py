"""The background batch loader: same batches as without it, ahead of time, clean shutdown."""

import threading
import time

import numpy as np
import pytest

from kdjax.data.prefetch import Prefetcher


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name.startswith("kdjax-prefetch")]


@pytest.mark.parametrize("depth,workers", [(0, 1), (1, 1), (3, 2)])
def test_serves_make_batch_of_each_step_in_order(depth, workers):
  make = lambda step: {"x": np.full((2,), step)}
  with Prefetcher(make, put=lambda b: {"x": b["x"] * 10}, start=5, stop=11, depth=depth,
                  workers=workers) as batches:
    got = [int(batches.get(step)["x"][0]) for step in range(5, 11)]
    with pytest.raises(ValueError, match=r"get\(11\): the next step served is 11"):
      batches.get(11)
  assert got == [10 * step for step in range(5, 11)]
  assert not _prefetch_threads()


def test_prepares_depth_batches_ahead_and_no_more():
  made = []
  with Prefetcher(lambda step: made.append(step) or step, start=0, stop=100,
                  depth=2) as batches:
    assert batches.get(0) == 0
    deadline = time.monotonic() + 5
    while len(made) < 3 and time.monotonic() < deadline:
      time.sleep(0.005)
    time.sleep(0.05)  # Would a fourth batch start? It must not.
    assert sorted(made) == [0, 1, 2]  # Step 0 served, 1 and 2 ready while 0 is consumed.
    with pytest.raises(ValueError, match="next step served is 1"):
      batches.get(2)  # Out of order.


def test_a_worker_error_is_raised_for_its_step_in_the_caller():
  def make(step):
    if step == 2:
      raise OSError("record 7 unreadable")
    return step

  with Prefetcher(make, start=0, stop=5, depth=2) as batches:
    assert [batches.get(0), batches.get(1)] == [0, 1]
    with pytest.raises(OSError, match="record 7 unreadable"):
      batches.get(2)
  assert not _prefetch_threads()


def test_leaving_early_cancels_pending_batches_without_hanging():
  started = []

  def slow(step):
    started.append(step)
    time.sleep(0.05)
    return step

  begin = time.monotonic()
  with pytest.raises(KeyboardInterrupt):
    with Prefetcher(slow, start=0, stop=1000, depth=8, workers=2) as batches:
      batches.get(0)
      raise KeyboardInterrupt  # What SIGINT (or Preempted after SIGTERM) does to the loop.
  assert time.monotonic() - begin < 2.0
  assert len(started) < 20 and not _prefetch_threads()


def test_bad_depth_is_refused_in_one_line():
  with pytest.raises(ValueError, match=r"config.prefetch\) must be an integer >= 0, got -1"):
    Prefetcher(lambda step: step, start=0, stop=3, depth=-1)


def test_prefetched_pipeline_batches_equal_direct_ones_from_a_resumed_step(data_dir):
  from kdjax.data import InputPipeline
  pipeline = InputPipeline("mnist1d", global_batch_size=64, seed=3, data_dir=data_dir)
  with Prefetcher(pipeline.train_batch, start=7, stop=13, depth=3, workers=2) as batches:
    for step in range(7, 13):
      prefetched, direct = batches.get(step), pipeline.train_batch(step)
      assert prefetched.keys() == direct.keys()
      for key in direct:
        np.testing.assert_array_equal(prefetched[key], direct[key])
