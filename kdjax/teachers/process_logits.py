"""A language model's teacher logits, computed once per window and shared by a suite's rows.

With `config.lm.teacher_logits = 'float32'` (or 'bfloat16' / 'float16': half the memory) a
run with a live language-model teacher does not run the teacher in its train and eval steps:
the teacher's logits on every window those steps read are computed before the first step, in
batches, held in host memory, and joined to the batches as `teacher_logits` [b, T, V]
(`kdjax.teachers.teacher.Teacher.outputs` then uses them instead of running the teacher). This
is the language-model counterpart of the classifiers' on-disk cache (`disk_cache`,
FKD, Shen & Xing 2022), kept in memory: batch `step` is a pure function of (seed, step), so
the rows of a suite (kd, fkl, jsd, adaspec; scratch's and every row's evaluations) read the
same windows, and the one process that runs them computes each window's logits once
(`shared_cache`; a second row, seed or evaluation only gathers). At the quickstart's size
(3254 training windows of 128 tokens, 259 logits) that is 431 MB in float32, 216 MB in 16 bits.

Equal to the live teacher up to rounding: the logits come from the same apply function and
variables, at another batch size (float32: differences of a few ulps from the matmuls'
blocking; 16-bit storage: the storage dtype's rounding, then used as float32).

Rows whose teacher sees other tokens than the batch's (DistiLLM's student samples, SeqKD's
teacher continuations), self-teachers, ensembles and feature-based methods keep the live
teacher in their train step; their evaluations still read the cached eval logits. GKD reads the
cache on its off-policy steps and runs the teacher on its on-policy samples only.
"""

import hashlib
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.progress import PhaseProgress
from kdjax.teachers import keys
from kdjax.validation import ConfigError

# The field of `config.lm` that turns the cache on, and its valid values ('' = off).
CONFIG_FIELD = "teacher_logits"
STORAGE_DTYPES = ("", "float32", "bfloat16", "float16")
# Windows per teacher forward when filling the cache: on 2 CPU cores the time per window is
# flat from 8 to 32 and grows beyond (the attention scores leave the caches).
DEFAULT_BATCH_SIZE = 16
# Refuse caches larger than this (host memory); a larger dataset keeps the live teacher.
MAX_BYTES = 8 * 1024 ** 3


def storage_dtype(config) -> str:
  """`config.lm.teacher_logits` checked: '' (off), 'float32', 'bfloat16' or 'float16'."""
  value = config.lm.get(CONFIG_FIELD, "")
  if value not in STORAGE_DTYPES:
    raise ConfigError(f"config.lm.{CONFIG_FIELD}={value!r}; valid: "
                      f"{', '.join(repr(v) for v in STORAGE_DTYPES)} ('' runs the teacher live).")
  return value


def trains_from_cache(needs) -> bool:
  """True when a method with these `TeacherNeeds` may read the teacher's logits from the cache
  in its train step: one loaded teacher's logits only (no taps, no ensemble, no self-teacher,
  no extra views), on the batch's own tokens (`on_batch_inputs`: AdaSPEC only adds its
  reference's logits; GKD's on-policy branch puts the teacher's logits on its samples in their
  place). SeqKD and DistiLLM, whose rewrites replace the tokens, keep the live teacher."""
  return (needs.kind == "one" and not needs.views and needs.cache != "features"
          and needs.on_batch_inputs)


def evaluates_from_cache(needs) -> bool:
  """True when the eval step may read the cached logits: the method's teacher is the run's one
  loaded teacher (not the student on state variables, not an ensemble)."""
  return needs.kind in ("none", "one")


def _digest(*arrays) -> str:
  digest = hashlib.blake2b(digest_size=16)
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(str((array.dtype, array.shape)).encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


class TeacherLogits:
  """Teacher logits by (split, window), filled on demand in batches of `batch_size`.

  Args:
    teacher_apply / teacher_variables: the run's teacher (host arrays).
    windows: split ('train' | 'eval') -> [num_windows, T] int32 model inputs of every window.
    dtype: the storage dtype ('float32', 'bfloat16', 'float16').
  """

  def __init__(self, teacher_apply, teacher_variables, windows: Dict[str, np.ndarray], *,
               dtype: str, batch_size: int = DEFAULT_BATCH_SIZE):
    self.windows, self.dtype, self.batch_size = windows, jnp.dtype(dtype), batch_size
    self._rows: Dict[str, Dict[int, np.ndarray]] = {split: {} for split in windows}
    self.progress = False  # `attach` turns the progress lines on (config.progress).
    self._variables = jax.device_put(teacher_variables)  # Once, not with every batch.
    dtype = self.dtype
    self._forward = jax.jit(
        lambda variables, tokens: teacher_apply(variables, tokens, train=False,
                                                rng=None)[0].logits.astype(dtype))

  @property
  def nbytes(self) -> int:
    return sum(row.nbytes for rows in self._rows.values() for row in rows.values())

  def ensure(self, split: str, indices) -> None:
    """Computes the logits of the windows `indices` of `split` not held yet."""
    rows = self._rows[split]
    missing = np.array(sorted(set(np.asarray(indices).reshape(-1).tolist()) - set(rows)),
                       np.int64)
    progress = PhaseProgress(f"teacher logits, {split}", len(missing), "windows",
                             enabled=self.progress)
    for begin in range(0, len(missing), self.batch_size):
      chunk = missing[begin:begin + self.batch_size]
      # Always a full batch (the last one padded with its first window): one compilation.
      padded = np.concatenate([chunk, np.full(self.batch_size - len(chunk), chunk[0])])
      logits = np.asarray(self._forward(self._variables, self.windows[split][padded]))
      for i, index in enumerate(chunk.tolist()):
        rows[index] = logits[i]
      progress.update(begin + len(chunk))

  def gather(self, split: str, indices) -> np.ndarray:
    """[len(indices), T, V] float32 logits of the windows `indices` of `split` (computed
    first where missing)."""
    indices = np.asarray(indices).reshape(-1)
    self.ensure(split, indices)
    rows = self._rows[split]
    return np.stack([rows[i] for i in indices.tolist()]).astype(np.float32)


# One cache per process (the last one asked for): a suite's rows run one after another.
_SHARED: Dict[str, TeacherLogits] = {}


def shared_cache(config, teacher_apply, teacher_variables, pipeline) -> TeacherLogits:
  """The process's cache for this teacher (model, dtype, variables' bytes), these windows
  (bytes) and `config.lm.teacher_logits`; a new one (replacing the last) when any differs."""
  windows = pipeline.split_window_inputs()
  key = "|".join([
      config.teacher.model, str(config.teacher.get("dtype", "float32")),
      str(config.teacher.get("fold_batch_norm", False)), storage_dtype(config),
      _digest(*jax.tree.leaves(teacher_variables)),
      _digest(*(windows[split] for split in sorted(windows)))])
  if key not in _SHARED:
    _SHARED.clear()
    _SHARED[key] = TeacherLogits(teacher_apply, teacher_variables, windows,
                                 dtype=storage_dtype(config))
  return _SHARED[key]


def attach(config, method, pipeline, teacher_apply, teacher_variables,
           num_steps: Optional[int] = None) -> Optional[TeacherLogits]:
  """Joins cached teacher logits to `pipeline`'s batches when `config.lm.teacher_logits` is
  set: training batches when the method trains from them (`trains_from_cache`; the windows of
  steps [0, num_steps) are computed now), eval and validation batches when it evaluates from
  them (computed now). Returns the cache, or None when nothing was attached.

  Raises:
    ConfigError: a bad `config.lm.teacher_logits`, or a cache over `MAX_BYTES`.
  """
  if not storage_dtype(config) or teacher_apply is None:
    return None
  train = trains_from_cache(method.teacher_needs)
  evaluate = evaluates_from_cache(method.teacher_needs)
  if not (train or evaluate):
    return None
  num_steps = config.num_steps if num_steps is None else num_steps
  needed = {"train": pipeline.train_window_indices(0, num_steps) if train else np.zeros([0])}
  if evaluate:
    needed["eval"] = np.arange(pipeline.num_eval_examples)
    needed["train"] = np.union1d(needed["train"], pipeline.validation_window_indices())
  itemsize = jnp.dtype(storage_dtype(config)).itemsize
  nbytes = sum(len(np.unique(v)) for v in needed.values()) * pipeline.sequence_length * (
      config.num_classes * itemsize)
  if nbytes > MAX_BYTES:
    raise ConfigError(
        f"config.lm.{CONFIG_FIELD}={storage_dtype(config)!r}: the teacher's logits on the "
        f"windows this run reads take {nbytes / 1024 ** 3:.1f} GiB, over the "
        f"{MAX_BYTES / 1024 ** 3:.0f} GiB limit; use '' (live teacher) or a 16-bit dtype.")
  cache = shared_cache(config, teacher_apply, teacher_variables, pipeline)
  cache.progress = bool(config.get("progress", True)) and jax.process_index() == 0
  for split, indices in needed.items():
    cache.ensure(split, indices)
  pipeline.attach_teacher_logits(cache.gather, key=keys.LOGITS_KEY, train=train,
                                 evaluate=evaluate)
  return cache
