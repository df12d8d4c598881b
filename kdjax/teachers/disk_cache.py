"""Teacher outputs cached on disk, read back into the training batches: the teacher never runs.

Written by `write_cache` (the entry point `python -m experiments.cache_teacher`) into
`<workdir>/teacher_cache/`, read by a run with `config.teacher.cache=<that directory>`
(`TeacherCache`, opened by `open_checked`): the writer and the reader of one format, together.

Augmentation replay, as in FKD (Shen & Xing 2022, "A Fast Knowledge Distillation Framework
for Visual Recognition"): FKD stores each crop's coordinates and flip with the teacher's soft
labels so that the student's pipeline can redo exactly that crop. In kdjax the whole training
batch `step` is already a pure function of (seed, step) (`InputPipeline.train_batch`), so the
student's run recomputes the very augmented batch the teacher saw; the cache only stores, per
(step, row) of the global batch, the teacher's outputs plus what identifies that row's input:
the example id (`index`) and a 64-bit digest of the augmented input's bytes. The reader checks
the ids of every batch and the digests of the first batch it reads, so a cache written with
other augmentation code (or data) is refused instead of silently teaching wrong targets.

Layout: `meta.json` (written last: a cache without it is incomplete) and
`steps-<first step>.array_record` files of `steps_per_file` records, one record per step: the
numpy `.npz` bytes of
  index [B] int32, input_digest [B] uint64,
  logits [B, C] float32 (all logits) or topk_logits [B, k] float32 (descending) and
  topk_indices [B, k] int32, and features/<tap> [B, ...] for each cached feature tap.
"""

import hashlib
import io
import json
import os
import threading
from typing import Dict, Optional

import numpy as np

from kdjax.teachers import keys
from kdjax.validation import ConfigError

CACHE_DIRNAME = "teacher_cache"
META_FILE = "meta.json"
FORMAT_VERSION = 1
STEPS_PER_FILE = 500

# The run config fields a cache is bound to: (meta key, config field). A run whose value differs
# would see other batches (seed, batch size, data, augmentation, sampler) or another teacher.
IDENTITY_FIELDS = (
    ("dataset", "dataset"),
    ("seed", "seed"),
    ("global_batch_size", "global_batch_size"),
    ("augment", "augment"),
    ("validation_examples", "validation_examples"),
    ("num_classes", "num_classes"),
    ("teacher_model", "teacher.model"),
)



class TeacherCacheError(ConfigError):
  """A cache that is missing, incomplete, or written for another run."""


def input_digests(inputs: np.ndarray) -> np.ndarray:
  """[B, ...] inputs -> [B] uint64: the first 8 bytes of each row's BLAKE2b digest."""
  inputs = np.ascontiguousarray(inputs)
  return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(),
                                  "little") for row in inputs], np.uint64)


def _config_value(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def cache_identity(config, *, sampler: str) -> dict:
  """What a cache written with `config` is bound to (see IDENTITY_FIELDS)."""
  identity = {key: _config_value(config, field) for key, field in IDENTITY_FIELDS}
  identity["sampler"] = sampler
  return identity


def _encode(arrays: Dict[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def _decode(record: bytes) -> Dict[str, np.ndarray]:
  with np.load(io.BytesIO(record), allow_pickle=False) as npz:
    return {key: npz[key] for key in npz.files}


def _file_name(first_step: int) -> str:
  return f"steps-{first_step:09d}.array_record"


def steps_for_epochs(epochs: int, train_examples: int, global_batch_size: int) -> int:
  """Steps that cover `epochs` passes over `train_examples` (the last batch may run over)."""
  return -(-epochs * train_examples // global_batch_size)


class TeacherCacheWriter:
  """Writes one record per step, in step order from 0; `close()` writes meta.json last."""

  def __init__(self, directory: str, meta: dict, *, steps_per_file: int = STEPS_PER_FILE):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._module = array_record_module
    self.directory, self.meta, self.steps_per_file = directory, dict(meta), steps_per_file
    os.makedirs(directory, exist_ok=True)
    self._writer, self.num_steps = None, 0

  def write(self, step: int, record: Dict[str, np.ndarray]):
    if step != self.num_steps:
      raise ValueError(f"TeacherCacheWriter.write: step {step}, expected {self.num_steps} "
                       "(steps are written in order from 0).")
    if step % self.steps_per_file == 0:
      if self._writer is not None:
        self._writer.close()
      # group_size 1: every record is its own chunk, for random access by step.
      self._writer = self._module.ArrayRecordWriter(
          os.path.join(self.directory, _file_name(step)), "group_size:1")
    self._writer.write(_encode(record))
    self.num_steps += 1

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    meta = dict(self.meta, format_version=FORMAT_VERSION, num_steps=self.num_steps,
                steps_per_file=self.steps_per_file)
    temporary = os.path.join(self.directory, META_FILE + ".tmp")
    with open(temporary, "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(temporary, os.path.join(self.directory, META_FILE))


def read_meta(directory: str) -> dict:
  """The cache's meta.json; TeacherCacheError when the directory holds no complete cache."""
  path = os.path.join(directory, META_FILE)
  if not os.path.isdir(directory):
    raise TeacherCacheError(f"config.teacher.cache={directory!r} does not exist; write one with "
                            "`python -m experiments.cache_teacher --config=... --workdir=...`.")
  if not os.path.isfile(path):
    raise TeacherCacheError(f"config.teacher.cache={directory!r} holds no {META_FILE}: not a "
                            "teacher cache, or its writing did not finish; write it again.")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise TeacherCacheError(f"config.teacher.cache={directory!r} has format version "
                            f"{meta.get('format_version')!r}; this kdjax reads version "
                            f"{FORMAT_VERSION}. Write the cache again.")
  return meta


def effective_topk(meta: dict, requested: int) -> Optional[int]:
  """The number of logits per row a run reads: None for all of them, else k.

  `requested` is `config.teacher.cache_topk` (0: whatever the cache holds)."""
  stored = meta["topk"]  # None: all logits stored.
  num_classes = meta["num_classes"]
  if requested and stored is not None and requested > stored:
    raise TeacherCacheError(f"config.teacher.cache_topk={requested} but the cache holds only the "
                            f"top-{stored} logits; use a value <= {stored} or 0 (all cached).")
  k = requested or stored
  return None if k is None or k >= num_classes else int(k)


def check_cache_matches(meta: dict, config, *, sampler: str, num_steps: int,
                        directory: str) -> None:
  """One-line TeacherCacheError naming the first field where the run differs from the cache."""
  expected = cache_identity(config, sampler=sampler)
  fields = dict(IDENTITY_FIELDS, sampler="the method's sampler")
  for key, value in expected.items():
    if meta.get(key) != value:
      where = fields[key] if key == "sampler" else f"config.{fields[key]}"
      raise TeacherCacheError(
          f"config.teacher.cache={directory!r} was written for {key}={meta.get(key)!r}, but "
          f"this run has {where}={value!r}; write a cache for this run "
          "(experiments.cache_teacher with the same config) or point to the matching one.")
  if meta["num_steps"] < num_steps:
    raise TeacherCacheError(
        f"config.teacher.cache={directory!r} covers {meta['num_steps']} steps but "
        f"config.num_steps={num_steps}; write it for at least {num_steps} steps "
        f"(experiments.cache_teacher --epochs=E or --config.num_steps={num_steps}).")


class TeacherCache:
  """Random-access reader: `rows(step, local, index, inputs)` -> the batch's cache entries.

  Thread-safe (the prefetch thread reads while the main thread trains)."""

  def __init__(self, directory: str, *, topk: int = 0):
    self.directory = directory
    self.meta = read_meta(directory)
    self.topk = effective_topk(self.meta, topk)
    self.feature_taps = tuple(self.meta.get("feature_taps", ()))
    self._readers, self._lock = {}, threading.Lock()
    self._digests_checked = False

  @property
  def num_classes(self) -> int:
    return int(self.meta["num_classes"])

  def _record(self, step: int) -> Dict[str, np.ndarray]:
    if not 0 <= step < self.meta["num_steps"]:
      raise TeacherCacheError(f"Teacher cache {self.directory!r} has steps 0..."
                              f"{self.meta['num_steps'] - 1}; step {step} was asked for.")
    per_file = self.meta["steps_per_file"]
    first = step - step % per_file
    with self._lock:
      reader = self._readers.get(first)
      if reader is None:
        from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
        reader = array_record_module.ArrayRecordReader(
            os.path.join(self.directory, _file_name(first)),
            "readahead_buffer_size:0,max_parallelism:0")
        self._readers[first] = reader
      return _decode(reader.read([step - first])[0])

  def rows(self, step: int, local: slice, *, index: np.ndarray,
           inputs: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """This process's rows `local` of global batch `step`, as train-step batch entries.

    Args:
      step: the training step.
      local: this process's rows of the global batch.
      index: [b] the example ids the pipeline produced for these rows; must equal the cache's.
      inputs: [b, ...] the augmented inputs; their digests are compared with the cache's on
        the first call (a check that the augmentation replays exactly).
    """
    record = self._record(step)
    if not np.array_equal(record["index"][local], index):
      raise TeacherCacheError(
          f"Teacher cache {self.directory!r} step {step}: the pipeline's examples differ from "
          "the cached ones (another dataset version, seed or sampler); write the cache again.")
    if inputs is not None and not self._digests_checked:
      if not np.array_equal(record["input_digest"][local], input_digests(inputs)):
        raise TeacherCacheError(
            f"Teacher cache {self.directory!r} step {step}: the augmented inputs differ from "
            "those the teacher saw (other augmentation code or data); write the cache again.")
      self._digests_checked = True
    out = {keys.FEATURES_PREFIX + tap: record["features/" + tap][local]
           for tap in self.feature_taps}
    if self.topk is None:
      out[keys.LOGITS_KEY] = record["logits"][local]
      return out
    if "logits" in record:  # All logits stored, fewer asked for.
      logits_k, indices_k = top_k(record["logits"][local], self.topk)
    else:
      logits_k = record["topk_logits"][local, :self.topk]
      indices_k = record["topk_indices"][local, :self.topk]
    out[keys.TOPK_LOGITS_KEY] = logits_k
    out[keys.TOPK_INDICES_KEY] = indices_k.astype(np.int32)
    return out

  def sample_outputs(self, batch: int = 2):
    """(logits [batch, C], {tap: [batch, ...]}) zeros of the cached shapes (method init)."""
    shapes = self.meta.get("feature_shapes", {})
    features = {tap: np.zeros((batch,) + tuple(shapes[tap]), np.float32)
                for tap in self.feature_taps}
    return np.zeros((batch, self.num_classes), np.float32), features

  def close(self):
    with self._lock:
      for reader in self._readers.values():
        reader.close()
      self._readers.clear()


def top_k(logits: np.ndarray, k: int):
  """[..., C] -> (values [..., k] descending, indices [..., k]), as `jax.lax.top_k`."""
  order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(logits, order, axis=-1), order.astype(np.int32)


def open_checked(config, *, sampler: str) -> TeacherCache:
  """The cache of `config.teacher.cache`, checked against the run's config (one-line
  TeacherCacheError naming the first mismatch). Whether the method can learn from it is the
  caller's check (`kdjax.methods.base.check_teacher_cache`)."""
  directory = config.teacher.cache
  meta = read_meta(directory)
  check_cache_matches(meta, config, sampler=sampler, num_steps=config.num_steps,
                      directory=directory)
  return TeacherCache(directory, topk=int(config.teacher.get("cache_topk", 0) or 0))


def teacher_digest(variables) -> str:
  """sha256 of the teacher's variables (which weights wrote the cache), 16 hex digits."""
  import jax  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(variables):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def write_cache(config, pipeline, *, directory: str, checkpoint_dir: str, num_steps: int,
                topk: Optional[int], features=(), epochs: int = 0,
                progress=None) -> dict:
  """Runs the teacher of `config` (from `checkpoint_dir`, as a live run would: dtype and
  BatchNorm folding from `config.teacher`) on the first `num_steps` training batches of
  `pipeline` and writes its outputs to `directory` (replaced if it exists).

  Args:
    config: the run's config (checked by the caller).
    pipeline: the run's `InputPipeline` (the batches the student will see).
    topk: logits kept per example (None: all).
    features: teacher feature taps to store as well.
    epochs: recorded in the metadata (the steps cover this many epochs; 0: config.num_steps).
    progress: called as `progress(done_steps, num_steps)` after each step, or None.

  Returns:
    {'directory', 'steps', 'topk', 'features', 'bytes', 'seconds'}.

  Raises:
    ConfigError: an unknown feature tap (one line naming the teacher's taps).
    CheckpointError: a missing or mismatched teacher checkpoint.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kdjax.data.prefetch import Prefetcher  # pylint: disable=g-import-not-at-top
  from kdjax.teachers import live  # pylint: disable=g-import-not-at-top

  sample = np.zeros((2,) + tuple(pipeline.spec.input_shape), np.float32)
  (apply,), (variables,) = live.load_models(
      [config.teacher.model], [checkpoint_dir], num_classes=config.num_classes,
      sample_inputs=sample, model_kwargs=lambda name: {})
  digest = teacher_digest(variables)  # Of the trained weights, before any folding.
  apply, variables = live.frozen_teacher(config.teacher.model, apply, variables, config=config,
                                         sample_inputs=sample, model_kwargs={})
  sample_output = jax.eval_shape(lambda: apply(variables, sample, train=False)[0])
  taps = list(features)
  unknown = [tap for tap in taps if tap not in sample_output.features]
  if unknown:
    raise ConfigError(
        f"--features={','.join(taps)}: teacher {config.teacher.model!r} has no tap "
        f"{', '.join(map(repr, unknown))}; its taps: {', '.join(sorted(sample_output.features))}.")

  @jax.jit
  def teacher_outputs(variables, inputs):
    output, _ = apply(variables, inputs, train=False, rng=None)
    out = {f"features/{tap}": output.features[tap].astype(jnp.float32) for tap in taps}
    logits = output.logits.astype(jnp.float32)
    if topk is None:
      out["logits"] = logits
    else:
      out["topk_logits"], out["topk_indices"] = jax.lax.top_k(logits, topk)
    return out

  from kdjax.methods.registry import get_method_class  # pylint: disable=g-import-not-at-top
  sampler = get_method_class(config.method).sampler
  meta = dict(cache_identity(config, sampler=sampler), topk=topk, feature_taps=taps,
              feature_shapes={tap: list(sample_output.features[tap].shape[1:]) for tap in taps},
              teacher_checkpoint=checkpoint_dir, teacher_digest=digest,
              teacher_dtype=config.teacher.get("dtype", "float32"),
              teacher_fold_batch_norm=config.teacher.get("fold_batch_norm", False),
              epochs=epochs or None)
  variables = jax.device_put(variables)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  writer = TeacherCacheWriter(directory, meta)
  start = time.perf_counter()

  def write(step, pending):
    host, outputs = pending
    writer.write(step, dict(host, **jax.device_get(outputs)))
    if progress is not None:
      progress(step + 1, num_steps)

  with Prefetcher(pipeline.train_batch, start=0, stop=num_steps, depth=2) as batches:
    pending = None  # The previous step's outputs, fetched while this step's teacher runs.
    for step in range(num_steps):
      batch = batches.get(step)
      outputs = teacher_outputs(variables, batch["inputs"])
      if pending is not None:
        write(step - 1, pending)
      pending = ({"index": batch["index"].astype(np.int32),
                  "input_digest": input_digests(batch["inputs"])}, outputs)
    if pending is not None:
      write(num_steps - 1, pending)
  writer.close()
  seconds = time.perf_counter() - start
  size = sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))
  return {"directory": directory, "steps": num_steps, "topk": topk, "features": taps,
          "bytes": size, "seconds": round(seconds, 2)}
