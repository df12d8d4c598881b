"""Checkpoints with orbax: periodic saves of the train state plus JSON metadata.

Each checkpoint holds two items: 'state' (the TrainState as host arrays) and 'meta' (JSON:
the run's identity, i.e. model names and config fingerprint, and host-side training
bookkeeping such as the partly accumulated metrics window). Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-write leaves the previous
checkpoint as the latest.
"""

import json
import os
import shutil
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdjax import paths
from kdjax.train import files


class CheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Saves and restores one run's train state under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = paths.resolve(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state_on_host: Any, meta: dict):
    self._check_free_space(step, state_on_host)
    # The tree's layout, so that a restore can tell a code change from damaged data.
    layout = {path: list(shape) for path, shape in _shapes_by_path(state_on_host).items()}
    meta = dict(meta, state_layout=layout)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_on_host), meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      if not files.is_disk_full(error):
        raise
      self._manager.reload()
      raise self._disk_full(step) from None

  def _disk_full(self, step: int, detail: str = "") -> files.DiskFullError:
    latest = self._manager.latest_step()
    return files.DiskFullError(
        os.path.join(self.directory, str(step)), detail +
        (f"the last good checkpoint (step {latest}) is kept" if latest is not None else
         "no checkpoint had been written yet") +
        "; free space and rerun the same command to continue")

  def _check_free_space(self, step: int, state_on_host: Any):
    """Refuses a save that cannot fit before orbax starts writing: a save that runs out of
    space mid-way ends in pages of tracebacks from orbax's writer threads."""
    leaves = jax.tree.leaves(state_on_host)
    # Raw bytes plus orbax's per-array files and metadata (measured: +20-40% on small states).
    needed = int(1.1 * sum(np.asarray(x).nbytes for x in leaves)) + 2048 * len(leaves) + 65536
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise self._disk_full(step, f"the checkpoint needs about {needed / 2**20:.1f} MiB, "
                                  f"{free / 2**20:.1f} MiB are free; ")

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_raw(self, step: int):
    """The saved state as nested dicts of numpy arrays (no target structure needed)."""
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

  def restore_meta(self, step: int) -> dict:
    return dict(self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore_latest_good(self, abstract_state: Any, *, check_meta=lambda step, meta: None,
                          log=print) -> Tuple[Optional[int], Any, Optional[dict]]:
    """Restores the newest checkpoint that reads back whole.

    A damaged checkpoint (truncated files, half-written metadata) is reported, moved aside to
    `<step>.damaged` (kept for inspection, and out of the way of the step's next save) and the
    previous one is tried. Raises CheckpointError if checkpoints exist but none is readable:
    a run never silently restarts from step 0. `check_meta(step, meta)` runs on each
    checkpoint's metadata before its state is read and raises to refuse it (e.g. a checkpoint
    of another model): such a refusal is not treated as damage.

    Returns:
      (step, state, meta), or (None, None, None) when there is no checkpoint at all.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      damaged = sorted(n for n in os.listdir(self.directory) if ".damaged" in n) if \
          os.path.isdir(self.directory) else []
      if damaged:  # An earlier attempt set every checkpoint aside: still no silent restart.
        raise CheckpointError(
            f"{self.directory} holds only damaged checkpoints ({', '.join(damaged)}); refusing "
            "to restart from step 0. Repair them, or delete them to train from scratch.")
      return None, None, None
    failures = []
    for step in steps:
      try:
        meta = self.restore_meta(step)
      except Exception as error:  # pylint: disable=broad-except
        meta, meta_error = None, error
      if meta is not None:
        check_meta(step, meta)  # Raises for a checkpoint of another run; not damage.
        self._check_layout(step, meta, abstract_state)
      try:
        if meta is None:
          raise meta_error
        state, meta = self.restore(step, abstract_state)
        _check_shapes(state, abstract_state)
      except Exception as error:  # orbax/tensorstore raise many types for damaged data.
        failures.append(f"step {step}: {type(error).__name__}: {str(error)[:300]}")
        log(f"Checkpoint at step {step} in {self.directory} is damaged or unreadable "
            f"({type(error).__name__}: {str(error)[:200]}); trying an earlier one.")
        self._set_aside(step)
        continue
      return step, state, meta
    raise CheckpointError(
        f"Checkpoints exist in {self.directory} but none could be restored (moved aside as "
        "*.damaged); refusing to restart from step 0. Errors:\n  " + "\n  ".join(failures))

  def _check_layout(self, step: int, meta: dict, abstract_state: Any):
    """A checkpoint whose tree differs from the code's (a parameter added or reshaped by a
    code change) is not damaged: it is refused and left in place."""
    if "state_layout" not in meta:  # Written before layouts were recorded.
      return
    saved = {p: tuple(s) for p, s in meta["state_layout"].items()}
    _check_same_structure(
        None, abstract_state,
        f"The checkpoint in {self.directory!r} (step {step}) was written by a different "
        "version of the train state; it is kept in place (use another workdir, or move that "
        "run directory aside to train it again). Differences",
        shapes=saved)

  def _set_aside(self, step: int):
    source = os.path.join(self.directory, str(step))
    if os.path.isdir(source) and jax.process_index() == 0:
      target = source + ".damaged"
      suffix = 1
      while os.path.exists(target):
        target = f"{source}.damaged{suffix}"
        suffix += 1
      try:
        os.rename(source, target)
      except FileNotFoundError:  # Another process of a multi-host run moved it first.
        pass
    self._manager.reload()

  def close(self):
    self._manager.close()


def _check_shapes(state, abstract_state):
  """A restored tree must have exactly the expected leaf shapes."""
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
    if np.shape(got) != tuple(want.shape):
      raise CheckpointError(f"restored leaf of shape {np.shape(got)}, expected {want.shape}")


def saved_model_name(directory: str) -> Optional[str]:
  """The model name recorded in the latest checkpoint of a kdjax run (None if unknown)."""
  directory = paths.resolve(directory)
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"No complete checkpoint in {directory!r}.")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return dict(meta).get("model")
  finally:
    manager.close()


def load_model_variables(directory: str, expected_variables: Any, *, model_name: str) -> dict:
  """Loads a trained model's variables from a kdjax run's checkpoint directory.

  Args:
    directory: a run's `checkpoints/` directory (the latest step is used).
    expected_variables: the model's variables (or their shapes), `{'params': ..., ...}`,
      used to check that the checkpoint holds this architecture.
    model_name: for error messages.

  Returns:
    `{'params': ..., **model_state}` as host arrays.
  """
  directory = paths.resolve(directory)
  if directory.endswith(EXPORTED_SUFFIX):
    return load_exported_variables(directory, expected_variables, model_name=model_name)
  if not os.path.isdir(directory):
    raise CheckpointError(
        f"Teacher checkpoint directory {directory!r} does not exist. Train the teacher first "
        "(include 'teacher' in config.suite) or set config.teacher.checkpoint to a kdjax run's "
        "checkpoints/ directory.")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"No complete checkpoint in {directory!r}.")
  meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  saved_model = meta.get("model")
  if saved_model is not None and saved_model != model_name:
    raise CheckpointError(
        f"The checkpoint in {directory!r} is of model {saved_model!r}, but the teacher is "
        f"configured as {model_name!r} (config.teacher.model).")
  try:
    # Restored without a target: plain nested dicts, checked against the model just below.
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  finally:
    manager.close()
  variables = {"params": restored["params"]["student"], **restored.get("model_state", {})}
  _check_same_structure(variables, expected_variables,
                        f"The checkpoint in {directory!r} (step {step}) does not match model "
                        f"{model_name!r}")
  return variables


def _shapes_by_path(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_same_structure(found, expected, context: str, *, shapes=None):
  """Raises CheckpointError listing missing / unexpected / reshaped leaves. `shapes` gives
  the found tree's {path: shape} directly (e.g. from a checkpoint's recorded layout)."""
  found_shapes = shapes if shapes is not None else _shapes_by_path(found)
  expected_shapes = _shapes_by_path(expected)
  missing = sorted(set(expected_shapes) - set(found_shapes))
  unexpected = sorted(set(found_shapes) - set(expected_shapes))
  wrong = [(p, found_shapes[p], expected_shapes[p]) for p in sorted(expected_shapes)
           if p in found_shapes and found_shapes[p] != expected_shapes[p]]
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
      details.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
      details.append("shape " + ", ".join(f"{p}: checkpoint {a} vs model {b}"
                                          for p, a, b in wrong[:3]))
    raise CheckpointError(f"{context}: " + "; ".join(details) + ".")


def save_model_variables(directory: str, variables: Any, *, model_name: str) -> str:
  """Writes a model's variables as a checkpoint that `load_model_variables` reads.

  The layout is a kdjax run's `checkpoints/` directory (one step, 0, holding the state items
  the loader reads: `params/student` and `model_state`; metadata naming the model), so that
  `config.teacher.checkpoint=directory` works for weights from elsewhere, such as a PyTorch
  teacher converted by `experiments/import_teacher.py`.

  Args:
    directory: where to write; relative or `~` paths are resolved. Must be new or empty (an
      import never overwrites a trained model).
    variables: `{'params': ..., **model_state}` (e.g. `batch_stats`), arrays or numpy.
    model_name: the kdjax model name, checked by the loader against `config.teacher.model`.

  Returns:
    The resolved directory.
  """
  directory = paths.resolve(directory)
  if "params" not in variables:
    raise ValueError(f"save_model_variables: variables must have a 'params' collection; got "
                     f"{sorted(variables)}.")
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointError(f"{directory!r} is not empty; save_model_variables writes into a new "
                          "or empty directory only.")
  state = {"params": {"student": jax.device_get(variables["params"])}}
  model_state = {name: jax.device_get(value) for name, value in variables.items()
                 if name != "params"}
  if model_state:  # Orbax stores no empty subtree; the loader defaults a missing one to {}.
    state["model_state"] = model_state
  checkpointer = Checkpointer(directory, max_to_keep=1)
  try:
    checkpointer.save(0, state, {"model": model_name})
  finally:
    checkpointer.close()
  return directory


# A trained model's variables as one file (flax msgpack): what kdjax ships as a ready teacher
# (the LM quickstart's) and what `experiments/export_model.py` writes from a run.
EXPORTED_SUFFIX = ".msgpack"


def export_model_variables(variables: Any, path: str, *, model_name: str,
                           dtype: Optional[str] = None, meta: Optional[dict] = None) -> int:
  """Writes `variables` ({'params': ..., **model_state}) to the file `path` with the model's
  name (checked on loading) and `meta` (JSON-able: how it was trained). `dtype` ('bfloat16')
  casts floating arrays to halve the file; loading casts them back to float32.
  Returns the file's size in bytes."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top
  cast = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else None
  if dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: None, 'float32' or 'bfloat16'.")

  def host(x):
    x = np.asarray(x)
    return x.astype(cast) if cast is not None and np.issubdtype(x.dtype, np.floating) else x

  payload = {"model": model_name, "meta": json.dumps(meta or {}),
             "variables": jax.tree.map(host, dict(variables))}
  data = serialization.msgpack_serialize(payload)
  files.write_atomic(path, data)
  return len(data)


def load_exported_variables(path: str, expected_variables: Any, *, model_name: str) -> dict:
  """The variables of a file written by `export_model_variables`, as float32 host arrays,
  checked against the model's expected variables."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise CheckpointError(f"Exported model file {path!r} does not exist.")
  with open(path, "rb") as f:
    payload = serialization.msgpack_restore(f.read())
  if payload.get("model") != model_name:
    raise CheckpointError(f"The exported model {path!r} is of model {payload.get('model')!r}, "
                          f"but the teacher is configured as {model_name!r} "
                          "(config.teacher.model).")
  variables = jax.tree.map(
      lambda x: x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x,
      payload["variables"])
  _check_same_structure(variables, expected_variables,
                        f"The exported model {path!r} does not match model {model_name!r}")
  return variables


def exported_meta(path: str) -> dict:
  """The `meta` stored with an exported model (how it was trained)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    return json.loads(serialization.msgpack_restore(f.read())["meta"])
