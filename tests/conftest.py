"""Shared fixtures: one generated MNIST-1D TFDS data dir for the whole session."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built_once(tmp_path_factory, name: str, build) -> str:
  """`build(directory)` run once per test run, whatever the number of pytest-xdist workers:
  the first worker to ask builds into a directory they all share (the run's base temp
  directory), the others wait on a file lock and read its result. Returns what `build`
  returned (a str, kept in `<name>.done`)."""
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # Each worker has its own base; their parent is shared.
    root = root.parent
  done = root / f"{name}.done"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      directory = root / name
      if directory.exists():  # A worker that died while building.
        shutil.rmtree(directory)
      directory.mkdir()
      done.write_text(build(str(directory)))
  return done.read_text()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data_dir with MNIST-1D prepared (array_record), shared by all tests."""
  from kdjax.data import catalog, sources

  def build(directory):
    sources.ensure_prepared(catalog.get_dataset_spec("mnist1d"), directory)
    return directory

  return built_once(tmp_path_factory, "tfds", build)


# The smoke quickstart: every run of configs/quickstart.py:smoke (teacher 60 steps, students 40).
SMOKE = ["-m", "experiments.main", "--config=configs/quickstart.py:smoke"]


@pytest.fixture(scope="session")
def smoke_suite(tmp_path_factory, data_dir):
  """(workdir, stdout) of the smoke quickstart, uninterrupted, on 1 device, in a fresh process.

  Trained once per test run (shared by the xdist workers): tests that need finished runs (a teacher to distil from, a
  finished `kd` to resume, damage or refuse) copy them with `copy_runs` instead of training
  their own. A run's numbers and its config fingerprint depend on its own config only (not on
  `suite` or `data_dir`), so a copied run is the one their `--config.suite=teacher,kd` command
  would train. Never change it: copy it (`copy_runs`) before rerunning or damaging anything."""
  import json  # pylint: disable=g-import-not-at-top

  def build(workdir):
    result = run_python(SMOKE + [f"--workdir={workdir}", f"--config.data_dir={data_dir}"])
    return json.dumps([workdir, result.stdout])

  workdir, stdout = json.loads(built_once(tmp_path_factory, "smoke_1dev", build))
  return workdir, stdout


def set_fields(config, fields: dict, *, separator: str = "."):
  """Sets `config.a.b = value` for every `{'a.b': value}` of `fields` (`separator`: what
  joins the names, '__' for keyword arguments); returns `config`."""
  for dotted, value in fields.items():
    *parents, leaf = dotted.split(separator)
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def copy_runs(smoke_workdir, workdir, runs):
  """Copies the run directories `runs` (e.g. ("teacher", "kd")) of a finished suite into
  `workdir` (created if needed); returns `workdir` as a str."""
  for run in runs:
    shutil.copytree(os.path.join(smoke_workdir, run), os.path.join(workdir, run))
  return str(workdir)


def random_variables(init, *, seed=0, jitter=0.0):
  """Variables in the shapes `init()` returns (a model's init, run only through `jax.eval_shape`:
  nothing is compiled), drawn with numpy: kernels N(0, 1/fan_in) (as lecun_normal), biases and
  running means 0, scales and running variances 1; then every leaf moved by
  `jitter * |N(0, 1)|` (non-trivial BatchNorm statistics; running variances stay positive).

  For tests whose subject is not the initializers: flax's run op by op, and each parameter
  shape compiles its own random-number program (0.2-0.3 s each here, ~15 s for a ResNet-8)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    field = getattr(path[-1], "key", None)
    if field == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = np.full(leaf.shape, 1.0 if field in ("scale", "var") else 0.0)
    return jax.numpy.asarray(value + jitter * np.abs(rng.normal(size=leaf.shape)), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(init))


def import_blocker(names) -> str:
  """Python source that makes importing any of the top-level packages `names` fail (as on a
  machine that lacks them), for `run_python(["-c", import_blocker(...) + code])`."""
  return f"""
import importlib.abc, runpy, sys
class _Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {tuple(names)!r}:
      raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, _Missing())
"""


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
