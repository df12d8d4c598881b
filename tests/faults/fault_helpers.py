"""Fault injection for the tests of tests/faults: damage a file, plant a link, and check the
contract of a command that meets it (exit status, one line, no traceback)."""

import glob
import os
import shutil

from conftest import SMOKE, run_python


def flip_byte(path: str, offset=None, mask: int = 0x10):
  """Flips bits `mask` of the byte at `offset` (default: the middle) of the file `path`."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= mask
    f.seek(0)
    f.write(data)


def truncate(path: str, keep: float = 0.5):
  """Cuts the file `path` to the fraction `keep` of its size."""
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))


def overwrite(path: str, data: bytes):
  with open(path, "wb") as f:
    f.write(data)


def plant_symlink(link: str, target: str):
  """Replaces whatever is at `link` by a symbolic link to `target` (what an attacker with
  write access to a shared workdir does)."""
  if os.path.lexists(link):
    if os.path.isdir(link) and not os.path.islink(link):
      shutil.rmtree(link)
    else:
      os.remove(link)
  os.symlink(target, link)


def array_data_file(step_dir: str) -> str:
  """The largest array-data file of an orbax checkpoint step (where the weights lie)."""
  candidates = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  return max(candidates, key=os.path.getsize)


def checkpoint_steps(run_dir: str):
  directory = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def victim(tmp_path, text: str = "precious\n") -> str:
  """A file outside every workdir, which no fault may change."""
  path = tmp_path / "outside" / "victim.txt"
  path.parent.mkdir(exist_ok=True)
  path.write_text(text)
  return str(path)


def suite(workdir, data_dir, *overrides, check=False):
  """`experiments.main` on the smoke quickstart's teacher and kd runs in `workdir`."""
  return run_python(SMOKE + ["--config.suite=teacher,kd", f"--workdir={workdir}",
                             f"--config.data_dir={data_dir}", *overrides], check=check)


def assert_one_line_error(result, exit_code: int, *fragments: str) -> str:
  """The command exited with `exit_code` and said exactly one line on stderr, `Error: ...`,
  containing every fragment; no traceback anywhere. Returns the line."""
  output = result.stdout + result.stderr
  assert "Traceback" not in output, output[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr[-3000:]
  assert result.returncode == exit_code, (result.returncode, lines[0])
  assert lines[0].startswith("Error: "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]
