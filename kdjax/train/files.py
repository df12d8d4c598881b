"""Every file kdjax writes in a workdir goes through here: crash-safe, symlink-safe, and a
damaged file ends in one line naming it.

    files.write_atomic(path, text)         # temp (O_EXCL|O_NOFOLLOW) + fsync + rename
    files.write_json_atomic(path, data)
    with files.open_append(path) as f:     # metrics.jsonl (O_APPEND|O_NOFOLLOW)
    fd = files.open_lock(path)             # .kdjax.lock (O_NOFOLLOW, a regular file only)
    files.remove(path)                     # unlinks a file of ours, never a link's target
    files.refuse_links_below(workdir)      # at a run's start: no planted link anywhere
    files.read_json(path)                  # DamagedFileError (one line) for a broken file

A shared results directory is where a planted symbolic link matters (`ln -s ~/victim
W/.kdjax.lock` made a run overwrite the victim): kdjax never creates, truncates, appends to,
renames onto or deletes a path that is a symbolic link it did not create; it refuses in one
line ("Refusing to write through the symbolic link ...; remove it"). Temporary files get
unpredictable names and are created with O_EXCL|O_NOFOLLOW, so a link planted at a temporary
name is never followed either. Deleting never follows a link (unlink removes the link).
"""

import contextlib
import errno
import json
import os
import stat
import tempfile


class WorkdirError(ValueError):
  """The workdir cannot be used: not creatable, not writable, or in use by another run."""


class UnsafePathError(WorkdirError):
  """A path kdjax would write is a symbolic link (or not a regular file) it did not create."""

  def __init__(self, path: str, what: str = "the symbolic link"):
    super().__init__(f"Refusing to write through {what} {path}; remove it (kdjax writes only "
                     "real files and directories inside a workdir).")


class DamagedFileError(WorkdirError):
  """A file kdjax wrote earlier does not read back (truncated, empty, not JSON); the message
  names it and says what to do."""


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


def refuse_link(path: str):
  """Raises UnsafePathError if `path` is a symbolic link (a missing path is fine)."""
  try:
    if stat.S_ISLNK(os.lstat(path).st_mode):
      raise UnsafePathError(path)
  except FileNotFoundError:
    pass


def refuse_links_below(directory: str):
  """Raises UnsafePathError naming the first symbolic link found anywhere below `directory`
  (not following links; `directory` itself may be one: the user chose it).

  Run once when a workdir is taken: a link planted in it would redirect what kdjax writes
  (a run directory linked elsewhere receives its checkpoints, and their cleanup). To share a
  teacher between workdirs, point config.teacher.checkpoint at it instead of linking it in."""
  for root, dirs, names in os.walk(directory, followlinks=False):
    for name in sorted(dirs) + sorted(names):
      path = os.path.join(root, name)
      if os.path.islink(path):
        raise UnsafePathError(path)


def check_directory_path(path: str, what: str):
  """Raises WorkdirError (one line) if the directory `path` cannot exist because it, or the
  nearest existing path above it, is a file: `HOME` or `KDJAX_DATA_DIR` set to a regular file
  ended in NotADirectoryError deep inside a dataset builder. `what` names the setting."""
  probe = os.path.abspath(path)
  while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  if os.path.lexists(probe) and not os.path.isdir(probe):
    where = "" if probe == os.path.abspath(path) else f" ({probe} is a file)"
    raise WorkdirError(f"{what}={path} cannot be a directory{where or ': it is a file'}; point "
                       "it at a directory.")


def _open_new(directory: str, basename: str):
  """(fd, path) of a new temporary file beside `basename`, created O_EXCL|O_NOFOLLOW (mkstemp's
  flags) under an unpredictable name, with the permissions `open(path, 'w')` would give."""
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + basename)
  os.fchmod(fd, 0o666 & ~_umask())
  return fd, tmp


def write_atomic(path: str, text):
  """Writes `text` (str, or bytes) to `path` through a temporary file, fsync and a rename,
  with the permissions a plain `open(path, 'w')` would give (0644 under umask 022).

  A reader (or a rerun after a kill) sees the old file or the new one, never a part. Raises
  UnsafePathError if `path` is a symbolic link, DiskFullError (the old file kept) on ENOSPC."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  refuse_link(path)
  fd, tmp = _open_new(directory, os.path.basename(path))
  try:
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    refuse_link(path)  # Again, just before the rename: a link planted while we wrote.
    os.replace(tmp, path)
  except BaseException as error:
    remove(tmp)
    if is_disk_full(error):
      raise DiskFullError(path, "the previous version of the file is kept") from None
    raise


def write_json_atomic(path: str, data) -> None:
  write_atomic(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def open_append(path: str):
  """A text file opened for appending, created if missing; never through a symbolic link."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
  except OSError as error:
    if error.errno == errno.ELOOP:
      raise UnsafePathError(path) from None
    raise
  with os.fdopen(fd, "a") as f:
    yield f


def open_lock(path: str) -> int:
  """A read-write descriptor of the lock file `path` (created if missing, never truncated
  here): not through a symbolic link, and only a regular file (a FIFO or device planted
  there could block or be written to)."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
  except OSError as error:
    if error.errno == errno.ELOOP:
      raise UnsafePathError(path) from None
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise UnsafePathError(path, "the special file")
  return fd


def create_exclusive(directory: str, basename: str) -> str:
  """Creates an empty new file beside `basename` in `directory` (unpredictable name, never
  through a link) and returns its path: a probe that the directory is writable."""
  fd, tmp = _open_new(directory, basename)
  os.close(fd)
  return tmp


def remove(path: str):
  """Deletes the file (or symbolic link: the link, never its target) `path`, if present.
  Refuses a directory: kdjax sets damaged directories aside, it does not delete them."""
  try:
    if stat.S_ISDIR(os.lstat(path).st_mode):
      raise IsADirectoryError(errno.EISDIR, "kdjax deletes files only", path)
    os.unlink(path)
  except FileNotFoundError:
    pass


def rename_aside(source: str, target: str):
  """Renames `source` to the new name `target` (both in one directory kdjax owns); refuses a
  `source` that is a symbolic link (it would move a planted link, not our data) and never
  replaces an existing `target`."""
  refuse_link(source)
  if os.path.lexists(target):
    raise FileExistsError(errno.EEXIST, "already exists", target)
  os.rename(source, target)


# What to do about each file kdjax writes, when it is found damaged.
_RECOVERY = {
    "run_summary.json": "delete it and rerun the same command: the run's final checkpoint is "
                        "kept, so only its final evaluation runs again",
    "summary.json": "rerun the experiments.main command that wrote it (finished runs are "
                    "skipped; the summary and report are written again)",
    "config.json": "delete it and rerun the same command (the run's checkpoints record its "
                   "config's fingerprint, which is still checked)",
}


def damaged(path: str, reason: str, recovery: str = "") -> DamagedFileError:
  """The one-line error for the damaged file `path`."""
  recovery = recovery or _RECOVERY.get(os.path.basename(path),
                                       "restore it from a copy, or delete it")
  return DamagedFileError(f"{path} is damaged ({reason}); {recovery}.")


def read_json(path: str, *, recovery: str = ""):
  """The JSON value in `path`; DamagedFileError (one line, the file named) if it is empty,
  truncated or not JSON. A missing file raises FileNotFoundError as usual."""
  with open(path, "rb") as f:
    data = f.read()
  if not data.strip():
    raise damaged(path, "empty", recovery)
  try:
    return json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    reason = (f"not JSON: {error}"
              if isinstance(error, json.JSONDecodeError) else "not UTF-8 text")
    raise damaged(path, reason, recovery) from None
