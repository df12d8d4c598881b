"""Crash-safe file writes: a reader never sees a half-written file, a full disk names the file."""

import errno
import json
import os
import tempfile


class DiskFullError(OSError):
  """The disk filled up while kdjax wrote a file; the message names it."""

  def __init__(self, path: str, detail: str = ""):
    super().__init__(errno.ENOSPC, "No space left on device", path)
    self.message = (f"No space left on device while writing {path}"
                    + (f"; {detail}" if detail else ""))

  def __str__(self):
    return self.message



def is_disk_full(error: BaseException) -> bool:
  """True for ENOSPC, also when a library (orbax, tensorstore) re-raised it as text."""
  return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
      "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomic(path: str, text):
  """Writes `text` (str, or bytes) to `path` through a temporary file and a rename, with the
  permissions a plain `open(path, 'w')` would give (0644 under umask 022; mkstemp alone gives
  0600)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as error:
    if os.path.exists(tmp):
      os.remove(tmp)
    if is_disk_full(error):
      raise DiskFullError(path, "the previous version of the file is kept") from None
    raise


def write_json_atomic(path: str, data) -> None:
  write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
