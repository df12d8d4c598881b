"""Crash-safe file writes: a reader never sees a half-written file."""

import json
import os
import tempfile


def write_atomic(path: str, text: str):
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, data) -> None:
  write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
