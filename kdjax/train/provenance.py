"""What produced a result: code version, library versions, hardware and data fingerprints.

`summary.json` and every `run_summary.json` carry `provenance`:

    {'git_commit': '26646a9...' or None, 'git_dirty': False or None,
     'versions': {'python': '3.11.7', 'jax': '0.10.2', 'jaxlib': ..., 'flax': ..., 'optax': ...,
                  'orbax-checkpoint': ..., 'grain': ..., 'kdjax': '0.1.0'},
     'device_kind': 'cpu', 'device_count': 1, 'process_count': 1,
     'datasets': {'mnist1d/train': {'examples': 4000, 'sha256': '...'}, 'mnist1d/test': ...}}

The git fields describe the checkout that holds the imported `kdjax` package (None when it is
not a git checkout, or git is missing). A split's fingerprint is the sha256 of its records as
the pipeline holds them (every field's name, dtype, shape and bytes, in record order), taken
once per process and split; a split too large to hold in memory is read record by record and
is not hashed (`sha256` None): reading it all again would cost an epoch.
"""

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from typing import Dict, Optional

import jax
import numpy as np

import kdjax

# Distribution names, as pip knows them.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")
_GIT_TIMEOUT_S = 10


def _version(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def source_dir() -> str:
  """The directory of the imported kdjax package: the code whose version is recorded."""
  return os.path.dirname(os.path.abspath(kdjax.__file__))


def _git(*args: str, directory: str) -> Optional[str]:
  try:
    result = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                            timeout=_GIT_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError):  # No git, or it hung.
    return None
  return result.stdout if result.returncode == 0 else None


@functools.lru_cache(maxsize=8)
def code_version(directory: Optional[str] = None) -> dict:
  """{'git_commit', 'git_dirty'} of the git checkout holding `directory` (default: the kdjax
  source tree), asked once per process; both None outside a git checkout or without git.
  Dirty: tracked files differ from the commit, or untracked files are not git-ignored."""
  directory = directory or source_dir()
  commit = _git("rev-parse", "HEAD", directory=directory)
  if commit is None:
    return {"git_commit": None, "git_dirty": None}
  status = _git("status", "--porcelain", directory=directory)
  return {"git_commit": commit.strip(),
          "git_dirty": None if status is None else bool(status.strip())}


def environment() -> dict:
  """Code, library versions and hardware of this process (no dataset fields)."""
  versions = {"python": platform.python_version()}
  versions.update({package: _version(package) for package in _PACKAGES})
  versions["kdjax"] = kdjax.__version__
  devices = jax.devices()
  return {**code_version(), "versions": versions,
          "device_kind": devices[0].device_kind if devices else None,
          "device_count": jax.device_count(), "process_count": jax.process_count()}


def fingerprint_arrays(arrays: Dict[str, np.ndarray]) -> str:
  """sha256 over each field's name, dtype, shape and bytes, fields in name order."""
  digest = hashlib.sha256()
  for key in sorted(arrays):
    array = np.ascontiguousarray(arrays[key])
    digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
    if array.dtype.kind == "O":  # Python objects (text as bytes): their values, not pointers.
      for value in array.ravel():
        digest.update(value if isinstance(value, bytes) else repr(value).encode())
    else:
      digest.update(array.reshape(-1).view(np.uint8))  # bfloat16-safe
  return digest.hexdigest()


# (dataset, split, data_dir, id(spec)) -> (spec, record); the spec is kept so that its id is
# not reused by another spec (a dataset registered again under the same name).
_SPLIT_FINGERPRINTS: Dict[tuple, tuple] = {}


def split_fingerprint(dataset: str, split: str, spec, data_dir: Optional[str],
                      num_examples: int, arrays: Optional[Dict[str, np.ndarray]]) -> dict:
  """{'examples', 'sha256'} of one split (computed once per process), sha256 None when the
  split is not held in memory (`arrays` None)."""
  key = (dataset, split, data_dir, id(spec))
  if key not in _SPLIT_FINGERPRINTS:
    _SPLIT_FINGERPRINTS[key] = (spec, {
        "examples": int(num_examples),
        "sha256": fingerprint_arrays(arrays) if arrays is not None else None})
  return dict(_SPLIT_FINGERPRINTS[key][1])


def dataset_fingerprints(pipeline, dataset: str, data_dir: Optional[str] = None) -> dict:
  """{'<dataset>/<split>': {'examples', 'sha256'}} of the pipeline's training and eval splits
  (a pipeline without `split_arrays`, such as a language model's, gives {})."""
  if not hasattr(pipeline, "split_arrays"):
    return {}
  spec = pipeline.spec
  records = {}
  for role, split in (("train", spec.train_split), ("eval", spec.eval_split)):
    arrays, count = pipeline.split_arrays(role)
    records[f"{dataset}/{split}"] = split_fingerprint(dataset, split, spec, data_dir, count,
                                                      arrays)
  return records


def teacher_provenance(checkpoints) -> list:
  """[{'checkpoint', 'step', 'sha256'}] of the teachers a student is distilled from: the step
  read (the latest of a run's checkpoints/ directory; None for an exported file) and one
  sha256 of its state (from the array checksums recorded at save time; of the file's bytes
  for an exported model; None for a checkpoint written before checksums were recorded)."""
  from kdjax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  records = []
  for directory in checkpoints:
    if str(directory).endswith(checkpoint_lib.EXPORTED_SUFFIX):
      with open(directory, "rb") as f:
        records.append({"checkpoint": directory, "step": None,
                        "sha256": hashlib.sha256(f.read()).hexdigest()})
      continue
    step, _, meta = checkpoint_lib.read_latest(directory, with_state=False)
    records.append({"checkpoint": directory, "step": int(step),
                    "sha256": checkpoint_lib.state_digest(meta)})
  return records


def run_provenance(pipeline, config) -> dict:
  """A run's provenance: `environment()` and its dataset splits' fingerprints."""
  return {**environment(),
          "datasets": dataset_fingerprints(pipeline, config.dataset, config.data_dir or None)}


def suite_provenance(run_summaries) -> dict:
  """A suite's provenance: `environment()` and the dataset fingerprints of its runs (those
  whose summaries record them)."""
  datasets = {}
  for summary in run_summaries:
    datasets.update((summary.get("provenance") or {}).get("datasets", {}))
  return {**environment(), "datasets": datasets}
