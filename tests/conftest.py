"""Shared fixtures: one generated MNIST-1D TFDS data dir for the whole session."""

import hashlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data_dir with MNIST-1D prepared (array_record), shared by all tests."""
  directory = str(tmp_path_factory.mktemp("tfds"))
  from kdjax.data import catalog, sources
  sources.ensure_prepared(catalog.get_dataset_spec("mnist1d"), directory)
  return directory


def run_python(args, *, env_extra=None, timeout=600, check=True, cwd=REPO):
  """Runs `python args...` in a fresh process (fresh jax, so XLA_FLAGS apply)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(env_extra or {})
  result = subprocess.run([sys.executable] + list(args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"python {' '.join(args)} failed ({result.returncode}):\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
  return result


def snapshot(directory) -> dict:
  """Relative path -> sha256 of every file under `directory` (to show nothing changed)."""
  digests = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests
