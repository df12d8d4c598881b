"""A run directory belongs to one training config: fingerprints and the reuse check."""

import hashlib
import json
import os
import time

import jax
import ml_collections

from kdjax import methods as methods_lib
from kdjax.train import files


class ConfigChanged(ValueError):
  """The run directory holds a run of another config."""


# Fields that do not change the trained numbers: a run may resume under different values.
_NOT_FINGERPRINTED = {"parallel", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                      "suite", "data_dir", "progress", "allow_config_change", "on_nonfinite",
                      "seeds", "sweep", "prefetch", "mesh",
                      "steps_per_call"}


def _training_fields(config) -> dict:
  """The fields that determine a run's numbers: not logging or parallelism, and of the
  per-method hyper-parameter blocks only the run's own method's."""
  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  other_methods = set(methods_lib.METHODS) - {data.get("method")}
  method = methods_lib.METHODS.get(data.get("method"))
  if isinstance(data.get("teacher"), dict) and (method is None or not method.teacher_needs.checkpoint):
    # A teacher-output cache changes nothing for a run without a teacher (teacher, scratch).
    data["teacher"] = {k: v for k, v in data["teacher"].items()
                       if k not in ("cache", "cache_topk")}
  return {k: v for k, v in data.items() if k not in _NOT_FINGERPRINTED | other_methods}


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of everything that changes the trained numbers (not logging / parallelism)."""
  relevant = _training_fields(config)
  return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _config_changes(old: dict, new: dict) -> list:
  old_flat, new_flat = _flatten(_training_fields(old)), _flatten(_training_fields(new))
  # Only fields both configs have: a field added to kdjax after the run was written (or one
  # since removed) says nothing about how the run was trained.
  keys = sorted(set(old_flat) & set(new_flat))
  return [f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in keys
          if json.dumps(old_flat.get(k), default=str) != json.dumps(new_flat.get(k), default=str)]


def check_run_dir(config, run_dir: str, name: str, *, move_aside: bool = True):
  """Refuses to reuse a run directory written with a different training config; with
  `config.allow_config_change` the old directory is moved aside (never deleted) when
  `move_aside`, i.e. when the run starts."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    return
  old = files.read_json(path)  # DamagedFileError (one line) if it does not read back.
  if not isinstance(old, dict):
    raise files.damaged(path, f"a JSON {type(old).__name__}, not a config")
  changes = _config_changes(old, json.loads(config.to_json()))
  if not changes:
    return
  if not config.get("allow_config_change", False):
    raise ConfigChanged(
        f"Run {name!r} in {run_dir!r} was trained with a different config ("
        + "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else "") +
        "). Use a new --workdir, or pass --config.allow_config_change=True to move the old run "
        "aside and train it again.")
  if not move_aside:  # A pre-flight check: the move happens when the run starts.
    return
  aside = f"{run_dir.rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    files.rename_aside(run_dir, aside)
  print(f"[{name}] config changed ({'; '.join(changes[:3])}); old run moved to {aside}",
        flush=True)
