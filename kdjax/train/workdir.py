"""The workdir of a suite: checked writable before any work, and held by one live run at a time.

    workdir = prepare_workdir("runs/quickstart")     # absolute, created, known writable
    with WorkdirLock(workdir):                        # refuses a second live run
      ...

The lock is an advisory `flock` on `workdir/.kdjax.lock`: the kernel drops it when its process
dies, so a lock left by a killed run never blocks the rerun. Only process 0 of a multi-host
run takes it (the other processes of the same run must not be refused). Taking it also checks
that no symbolic link was planted anywhere in the workdir (`files.refuse_links_below`): a
shared results directory must not redirect what a run writes.
"""

import errno
import fcntl
import os
import socket
import time

from kdjax import paths
from kdjax.train import files
from kdjax.train.files import WorkdirError  # pylint: disable=unused-import  (re-exported)

LOCK_FILE = ".kdjax.lock"


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if needed and checks that files can be written in it.

  Returns:
    The absolute path.
  """
  if not workdir:
    raise WorkdirError("No workdir given; pass --workdir=DIR (relative paths and ~ work).")
  path = paths.resolve(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {path!r} is a file, not a directory; choose another "
                       "--workdir.")
  try:
    os.makedirs(path, exist_ok=True)
    files.remove(files.create_exclusive(path, "kdjax-write-test"))
  except OSError as error:
    reason = os.strerror(error.errno) if error.errno else str(error)
    raise WorkdirError(f"workdir {path!r} cannot be created or written ({reason}"
                       f"{': ' + error.filename if error.filename else ''}); choose another "
                       "--workdir.") from None
  return path


class WorkdirLock:
  """Holds `workdir/.kdjax.lock` while a run uses the workdir (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(paths.resolve(workdir), LOCK_FILE)
    self.enabled = enabled
    self._fd = None

  def __enter__(self):
    if not self.enabled:
      return self
    fd = files.open_lock(self.path)  # Never through a planted link (UnsafePathError).
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
      os.close(fd)
      if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
        raise WorkdirError(
            f"workdir {os.path.dirname(self.path)!r} is in use by {holder}; wait for it to "
            "finish (or stop it), or use another --workdir.") from None
      raise
    try:
      files.refuse_links_below(os.path.dirname(self.path))
    except files.UnsafePathError:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise
    os.ftruncate(fd, 0)
    os.write(fd, (f"process {os.getpid()} on {socket.gethostname()} "
                  f"(started {time.strftime('%Y-%m-%d %H:%M:%S')})").encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      # The file stays (removing it would race with a process waiting on it); the lock goes.
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
