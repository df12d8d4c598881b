"""SIGTERM / SIGINT: one handler for the whole command, so no phase loses a stop signal.

A scheduler's SIGTERM (or a Ctrl-C) may arrive at any moment: while the flags are parsed, the
dataset generated, a run trains, between two runs of a suite, while the report is written.
`handling_stop_signals()` is entered once, before any work (`experiments.main` and
`kdjax.train.run_suite` both enter it; nesting is free), and keeps one handler installed
until the command ends:

* inside `deferred()` (the train loop) a signal only sets a flag, which the loop reads at step
  boundaries: it writes a checkpoint and raises `Preempted` (the grace period after SIGTERM is
  spent saving, not lost mid-step);
* everywhere else the handler raises `Preempted` at once. Every file kdjax writes is replaced
  atomically (`kdjax.train.files`), so stopping between two bytecodes loses nothing written.

The flag persists across runs: a signal that arrives as one run of a suite finishes stops the
suite before the next run starts (it used to be forgotten with the run's own handler).
`experiments.main` turns `Preempted` into exit status 75 ("try again") and one line, or 130
for a Ctrl-C before any work started.

Imports nothing heavy: the command line installs it before JAX is imported.
"""

import contextlib
import signal
import threading
from typing import Optional

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
  """A stop signal ended the command; what was written is kept and the same command continues.

  A BaseException, as KeyboardInterrupt: code that handles `Exception` (a library's retry, a
  cleanup that re-wraps errors) must not turn a stop into another error or swallow it.

  Attributes:
    signal_name: 'SIGTERM' or 'SIGINT' (None: a stop agreed with another host).
    work_started: whether any run had begun (its workdir taken) when the signal came.
  """

  def __init__(self, message: str, *, signal_name: Optional[str] = None,
               work_started: bool = True):
    super().__init__(message)
    self.signal_name = signal_name
    self.work_started = work_started


class _Handler:
  """The process's one handler: a flag, a deferral depth and the handlers it replaced."""

  def __init__(self):
    self.received: Optional[str] = None
    self.work_started = False
    self.depth = 0      # Nesting of `handling_stop_signals`.
    self.deferring = 0  # Nesting of `deferred`.
    self.previous = {}

  def __call__(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    if not self.deferring:
      raise self.preempted("")

  def preempted(self, where: str) -> Preempted:
    done = ("nothing written was lost; rerun the same command to continue" if self.work_started
            else "nothing was started")
    return Preempted(f"received {self.received}{where}: {done}.",
                     signal_name=self.received, work_started=self.work_started)


_HANDLER = _Handler()


@contextlib.contextmanager
def handling_stop_signals():
  """Installs the handler for the duration (outermost entry only; a no-op off the main thread,
  where Python cannot install handlers)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _HANDLER.depth == 0:
    _HANDLER.received, _HANDLER.work_started = None, False
    for sig in _SIGNALS:
      _HANDLER.previous[sig] = signal.signal(sig, _HANDLER)
  _HANDLER.depth += 1
  try:
    yield
  finally:
    _HANDLER.depth -= 1
    if _HANDLER.depth == 0:
      for sig, previous in _HANDLER.previous.items():
        signal.signal(sig, previous)
      _HANDLER.previous.clear()


@contextlib.contextmanager
def deferred():
  """Signals inside only set the flag (`received()`); the caller checks it at safe points.
  A signal still pending when the block ends is raised as `Preempted` there."""
  installed = _HANDLER.depth > 0
  with contextlib.ExitStack() as stack:
    if not installed:  # A loop called on its own (tests, notebooks): handle for its duration.
      stack.enter_context(handling_stop_signals())
    _HANDLER.deferring += 1
    try:
      yield
    finally:
      _HANDLER.deferring -= 1
    raise_if_received()


def received() -> Optional[str]:
  """The name of the stop signal received ('SIGTERM', 'SIGINT'), or None."""
  return _HANDLER.received


def mark_work_started() -> None:
  """From here on a Ctrl-C is a preemption (exit 75, continue), not an abort (130)."""
  _HANDLER.work_started = True


def raise_if_received(where: str = "") -> None:
  """Raises `Preempted` if a stop signal arrived (a boundary between two phases)."""
  if _HANDLER.received is not None:
    raise _HANDLER.preempted(where)
