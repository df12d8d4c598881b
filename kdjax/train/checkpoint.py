"""Checkpoints with orbax: periodic saves of the train state plus JSON metadata.

Each checkpoint holds two items: 'state' (the TrainState as host arrays) and 'meta' (JSON:
the run's identity, i.e. model names and config fingerprint, and host-side training
bookkeeping such as the partly accumulated metrics window). Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-write leaves the previous
checkpoint as the latest.

Integrity: the metadata records a sha256 of every saved array (its dtype, shape and bytes,
`array_checksums`) and of the metadata itself. A restore recomputes them from what it read:
a flipped byte that the storage format does not notice (a run resumed from it "worked" and
ended with other numbers) is damage like a truncated file. The run's own checkpoints fall
back to the previous good step; a teacher's (or `load_run`'s) is refused in one line naming
the step directory. Checkpoints written before checksums were recorded are read unverified.
"""

import hashlib
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


class DamagedCheckpoint(CheckpointError):
  """A checkpoint step whose arrays or metadata do not match the checksums recorded when it
  was saved."""


# --- checksums -----------------------------------------------------------------------------

# Metadata keys: {array name: sha256} of the saved state, and the sha256 of the metadata
# itself (every other key, as sorted JSON).
_CHECKSUMS, _META_CHECKSUM = "checksums", "meta_sha256"


def _leaf_name(path) -> str:
  """'params/student/Dense_0/kernel': the same for a TrainState's attributes and the nested
  dicts a restore without a target gives."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def array_checksums(tree) -> dict:
  """{array name: sha256 of its dtype, shape and bytes} of every leaf of `tree`."""
  sums = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    array = np.ascontiguousarray(np.asarray(leaf))
    digest = hashlib.sha256(f"{array.dtype.name}|{array.shape}|".encode())
    # A uint8 view, not memoryview: the buffer protocol rejects bfloat16 (ml_dtypes).
    digest.update(array.reshape(-1).view(np.uint8))
    sums[_leaf_name(path)] = digest.hexdigest()
  return sums


def _meta_checksum(meta: dict) -> str:
  rest = {k: v for k, v in meta.items() if k != _META_CHECKSUM}
  return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def with_checksums(state_on_host: Any, meta: dict) -> dict:
  """`meta` plus the checksums of `state_on_host` and of the metadata itself."""
  meta = dict(meta, **{_CHECKSUMS: array_checksums(state_on_host)})
  meta[_META_CHECKSUM] = _meta_checksum(meta)
  return meta


def verify_meta(meta: dict, where: str):
  """Raises DamagedCheckpoint if the metadata of the step directory `where` differs from its
  recorded checksum (accepted as is when it has none: written by an older kdjax)."""
  if _META_CHECKSUM in meta and meta[_META_CHECKSUM] != _meta_checksum(meta):
    raise DamagedCheckpoint(f"checksum mismatch in {os.path.join(where, 'meta')}")


def verify(state: Any, meta: dict, where: str):
  """Raises DamagedCheckpoint if `state` (as restored) or `meta` differ from the checksums
  recorded at save time; `where` (the step directory) names it. Metadata without checksums
  (written by an older kdjax) is accepted as is."""
  verify_meta(meta, where)
  recorded = meta.get(_CHECKSUMS)
  if recorded is None:
    return
  found = array_checksums(state)
  bad = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
  if bad:
    missing = [name for name in bad if name not in found]
    raise DamagedCheckpoint(
        f"checksum mismatch in {len(bad)} of {len(recorded)} arrays of "
        f"{os.path.join(where, 'state')}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
        + (f" ({len(missing)} missing)" if missing else ""))


def state_digest(meta: dict) -> Optional[str]:
  """One sha256 for a checkpoint's whole state (from its recorded array checksums), for
  provenance: which teacher a student was distilled from. None for an older checkpoint."""
  recorded = meta.get(_CHECKSUMS)
  if recorded is None:
    return None
  return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()


class Checkpointer:
  """Saves and restores one run's train state under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = paths.resolve(directory)
    if os.path.isdir(self.directory):  # Orbax follows links when it reads, writes, deletes.
      files.refuse_links_below(self.directory)
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
    meta = with_checksums(state_on_host, dict(meta, state_layout=layout))
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
    """(state, meta) of `step`, verified against its checksums (DamagedCheckpoint)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], dict(restored["meta"])
    verify(state, meta, self.step_directory(step))
    return state, meta

  def restore_raw(self, step: int):
    """The saved state as nested dicts of numpy arrays (no target structure needed),
    verified against its checksums (DamagedCheckpoint)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    verify(restored["state"], dict(restored["meta"]), self.step_directory(step))
    return restored["state"]

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

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
    failures, set_aside = [], []
    for step in steps:
      try:
        meta = self.restore_meta(step)
        verify_meta(meta, self.step_directory(step))  # Before trusting its identity.
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
        reason = (str(error) if isinstance(error, DamagedCheckpoint) else
                  f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
        failures.append(f"step {step}: {reason}")
        set_aside.append((step, reason, self._set_aside(step)))
        continue
      for bad_step, reason, moved_to in set_aside:
        log(f"Checkpoint at step {bad_step} in {self.directory} is damaged ({reason}); set "
            f"aside as {os.path.basename(moved_to)}, using step {step}.")
      return step, state, meta
    raise CheckpointError(
        f"Checkpoints exist in {self.directory} but none could be restored (moved aside as "
        "*.damaged); refusing to restart from step 0. Errors: " + "; ".join(failures))

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

  def _set_aside(self, step: int) -> str:
    """Renames the step's directory to `<step>.damaged` (or `.damaged1`, ...); returns it."""
    source = self.step_directory(step)
    target = source + ".damaged"
    suffix = 1
    while os.path.lexists(target):
      target = f"{source}.damaged{suffix}"
      suffix += 1
    if os.path.isdir(source) and jax.process_index() == 0:
      try:
        files.rename_aside(source, target)
      except FileNotFoundError:  # Another process of a multi-host run moved it first.
        pass
    self._manager.reload()
    return target

  def close(self):
    self._manager.close()


def _check_shapes(state, abstract_state):
  """A restored tree must have exactly the expected leaf shapes."""
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
    if np.shape(got) != tuple(want.shape):
      raise CheckpointError(f"restored leaf of shape {np.shape(got)}, expected {want.shape}")


def _damaged_message(where: str, reason: str) -> str:
  """One line: which step directory is damaged, why, and what to do."""
  run_dir = os.path.dirname(os.path.dirname(where))
  summary = os.path.join(run_dir, "run_summary.json")
  if os.path.exists(summary):  # A finished kdjax run: retraining its last steps restores it.
    fix = (f"move it aside (mv {where} {where}.damaged) and delete {summary}; rerunning that "
           "run's command then trains its last steps again from the previous checkpoint")
  else:
    fix = "replace it with an intact copy"
  return f"The checkpoint {where} is damaged ({reason}); {fix}."


def checkpoint_path_problem(path: str) -> Optional[str]:
  """Why `path` cannot be a checkpoint directory ('is a file, not a checkpoint directory',
  'does not exist'), or None: for config checks that name the field."""
  if os.path.isdir(path):
    return None
  if os.path.lexists(path):
    return "is a file, not a checkpoint directory"
  return "does not exist"


def read_latest(directory: str, *, with_state: bool = True) -> Tuple[int, Any, dict]:
  """(step, state as nested dicts of host arrays or None, meta) of the newest step of a kdjax
  checkpoint directory, read without a target and verified against its checksums.

  For checkpoints that are read, not resumed (a teacher's, `load_run`'s): a damaged step is
  refused in one line naming its directory (CheckpointError), never replaced silently by an
  older one. Raises CheckpointError also for a path that is a file or holds no checkpoint."""
  directory = paths.resolve(directory)
  problem = checkpoint_path_problem(directory)
  if problem:
    raise CheckpointError(f"{directory!r} {problem}; give a kdjax run's checkpoints/ "
                          "directory (or an exported *.msgpack model).")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"No complete checkpoint in {directory!r}.")
    where = os.path.join(directory, str(step))
    try:
      items = dict(meta=ocp.args.JsonRestore())
      if with_state:
        items["state"] = ocp.args.StandardRestore()
      restored = manager.restore(step, args=ocp.args.Composite(**items))
      meta = dict(restored["meta"])
      state = restored["state"] if with_state else None
      if with_state:
        verify(state, meta, where)
      else:
        verify_meta(meta, where)
    except DamagedCheckpoint as error:
      raise CheckpointError(_damaged_message(where, str(error))) from None
    except Exception as error:  # orbax/tensorstore raise many types for damaged data.
      raise CheckpointError(_damaged_message(
          where, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")) from None
  finally:
    manager.close()
  return step, state, meta


def unfinished_run(directory: str) -> Optional[Tuple[int, int]]:
  """(latest step, the run's num_steps) when `directory` is the checkpoints/ of a run that
  stopped before its last step (a killed teacher run); None when finished or not known.

  The run's num_steps is in each step's meta (checkpoints written since it was recorded);
  for older ones, in the run's config.json beside checkpoints/ while no run_summary.json
  says the run finished."""
  step, _, meta = read_latest(directory, with_state=False)
  num_steps = meta.get("num_steps")
  if num_steps is None:
    run_dir = os.path.dirname(os.path.normpath(paths.resolve(directory)))
    config_path = os.path.join(run_dir, "config.json")
    if (os.path.basename(os.path.normpath(directory)) != "checkpoints" or
        os.path.exists(os.path.join(run_dir, "run_summary.json")) or
        not os.path.isfile(config_path)):
      return None
    try:
      with open(config_path) as f:
        num_steps = json.load(f).get("num_steps")
    except (OSError, ValueError):
      return None
  if isinstance(num_steps, int) and step < num_steps:
    return int(step), num_steps
  return None


def saved_model_name(directory: str) -> Optional[str]:
  """The model name recorded in the latest checkpoint of a kdjax run (None if unknown)."""
  _, _, meta = read_latest(directory, with_state=False)
  return meta.get("model")


def load_model_variables(directory: str, expected_variables: Any, *, model_name: str) -> dict:
  """Loads a trained model's variables from a kdjax run's checkpoint directory.

  Args:
    directory: a run's `checkpoints/` directory (the latest step is used, verified against
      the checksums recorded when it was saved).
    expected_variables: the model's variables (or their shapes), `{'params': ..., ...}`,
      used to check that the checkpoint holds this architecture.
    model_name: for error messages.

  Returns:
    `{'params': ..., **model_state}` as host arrays.
  """
  directory = paths.resolve(directory)
  if directory.endswith(EXPORTED_SUFFIX):
    return load_exported_variables(directory, expected_variables, model_name=model_name)
  if checkpoint_path_problem(directory) == "does not exist":
    raise CheckpointError(
        f"Teacher checkpoint directory {directory!r} does not exist. Train the teacher first "
        "(include 'teacher' in config.suite) or set config.teacher.checkpoint to a kdjax run's "
        "checkpoints/ directory.")
  # Restored without a target: plain nested dicts, checked against the model just below.
  step, restored, meta = read_latest(directory)
  saved_model = meta.get("model")
  if saved_model is not None and saved_model != model_name:
    raise CheckpointError(
        f"The checkpoint in {directory!r} is of model {saved_model!r}, but the teacher is "
        f"configured as {model_name!r} (config.teacher.model).")
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

  host_variables = jax.tree.map(host, dict(variables))
  payload = {"model": model_name, "meta": json.dumps(meta or {}), "variables": host_variables,
             _CHECKSUMS: array_checksums(host_variables)}
  data = serialization.msgpack_serialize(payload)
  files.write_atomic(path, data)
  return len(data)


def load_exported_variables(path: str, expected_variables: Any, *, model_name: str) -> dict:
  """The variables of a file written by `export_model_variables`, as float32 host arrays,
  checked against the model's expected variables."""
  if not os.path.isfile(path):
    raise CheckpointError(f"Exported model file {path!r} does not exist.")
  payload = _read_exported(path)
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


def _read_exported(path: str) -> dict:
  """The payload of an exported model file, verified against its array checksums (files
  exported before they were recorded are read unverified); CheckpointError in one line naming
  the file when it is truncated, not a kdjax export, or damaged."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  fix = ("export it again (experiments/export_model.py), or reinstall kdjax if it is a "
         "shipped asset")
  with open(path, "rb") as f:
    data = f.read()
  try:
    payload = serialization.msgpack_restore(data)
    if not isinstance(payload, dict) or not {"model", "meta", "variables"} <= set(payload):
      raise ValueError("not a kdjax exported model")
    json.loads(payload["meta"])
  except Exception as error:  # msgpack raises its own types for truncated data.
    raise CheckpointError(f"The exported model file {path} is damaged ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:120]}; {len(data)} bytes); "
                          f"{fix}.") from None
  recorded = payload.get(_CHECKSUMS)
  if recorded is not None:
    found = array_checksums(payload["variables"])
    bad = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
    if bad:
      raise CheckpointError(f"The exported model file {path} is damaged (checksum mismatch in "
                            f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); {fix}.")
  return payload


def exported_meta(path: str) -> dict:
  """The `meta` stored with an exported model (how it was trained)."""
  return json.loads(_read_exported(path)["meta"])
