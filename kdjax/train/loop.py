"""One training run: student (and its method) trained against a fixed teacher.

    summary = train_and_evaluate(config, run_dir, teacher_checkpoints=[...])

Resumes from the latest checkpoint in `run_dir/checkpoints`; a finished run (with
`run_dir/run_summary.json`) is not retrained. SIGTERM / SIGINT write a checkpoint at the next
step boundary and raise `Preempted`; rerunning the same command continues.
"""

import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as data_lib
from kdjax import paths
from kdjax import methods as methods_lib
from kdjax import models as models_lib
from kdjax.methods.base import Batch
from kdjax.train import checkpoint as checkpoint_lib
from kdjax.train import files, metrics as metrics_lib, optimizer as optimizer_lib
from kdjax.train import parallel as parallel_lib, state as state_lib, step as step_lib
from kdjax.train import teachers as teachers_lib
from kdjax.train.config_paths import resolve_config_paths
from kdjax.train.run_dir import check_run_dir, config_fingerprint
from kdjax.train.signals import StopSignals
from kdjax.train.validate import validate_config

RUN_SUMMARY = "run_summary.json"


class Preempted(RuntimeError):
  """Raised after a checkpoint was written in response to SIGTERM / SIGINT."""


class NonFiniteLoss(FloatingPointError):
  pass


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _model_kwargs(name: str, parallel) -> dict:
  if name in models_lib.USES_BATCH_NORM and parallel.batch_norm_axis_name:
    return {"batch_norm_axis_name": parallel.batch_norm_axis_name}
  return {}


def _sample_inputs(spec, batch_size=2):
  return np.zeros((batch_size,) + tuple(spec.input_shape), np.float32)


def _mean_window(window):
  """Means over the logged steps; skipped non-finite steps are counted, not averaged in."""
  keys = window[0].keys()
  out = {}
  for k in keys:
    values = np.array([m[k] for m in window], np.float64)
    if k == "skipped_nonfinite":
      out[k] = float(values.sum())
    else:
      finite = values[np.isfinite(values)]
      out[k] = float(finite.mean()) if finite.size else float("nan")
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, run_dir: str, *,
                       teacher_checkpoints: Sequence[str] = (), name: str = "run") -> dict:
  """Trains `config.student.model` with `config.method`; returns the run summary.

  Args:
    config: a validated experiment config for this one run.
    run_dir: the run's directory (checkpoints, metrics, summary).
    teacher_checkpoints: the checkpoints/ directories of the teachers of
      `teachers.teacher_specs(config)`, in that order, if the method needs a teacher (methods
      with `multiple_teachers` use all of them, the others the first).
    name: the run's name in progress lines.
  """
  config = resolve_config_paths(config)
  run_dir = paths.resolve(run_dir)
  if isinstance(teacher_checkpoints, str):
    teacher_checkpoints = [teacher_checkpoints]
  teacher_checkpoints = [paths.resolve(directory) for directory in teacher_checkpoints]
  validate_config(config, num_devices=jax.device_count())
  check_run_dir(config, run_dir, name)
  is_writer = jax.process_index() == 0
  summary_path = os.path.join(run_dir, RUN_SUMMARY)
  if os.path.exists(summary_path):
    if is_writer and config.progress:
      print(f"[{name}] finished earlier ({summary_path}); skipped. Delete {run_dir} to train "
            "it again.", flush=True)
    return files.read_json(summary_path)
  method_class = methods_lib.get_method_class(config.method)
  if method_class.needs_teacher and not teacher_checkpoints:
    raise checkpoint_lib.CheckpointError(
        f"Method {config.method!r} needs a teacher; set config.teacher.checkpoint or put "
        "'teacher' first in config.suite.")

  parallel = parallel_lib.get_parallel(config.parallel)
  pipeline = data_lib.InputPipeline(
      config.dataset, global_batch_size=config.global_batch_size, seed=config.seed,
      data_dir=config.data_dir or None, process_index=jax.process_index(),
      process_count=jax.process_count(), augment=config.augment)
  spec = pipeline.spec
  method = methods_lib.build_method(config, num_train_examples=pipeline.num_train_examples)

  student_module = models_lib.get_model(config.student.model, num_classes=config.num_classes,
                                        **_model_kwargs(config.student.model, parallel))
  student_apply = models_lib.apply_fn(student_module)
  init_rng, method_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  sample = _sample_inputs(spec)
  student_variables = jax.device_get(
      models_lib.init_variables(student_module, init_rng, sample))

  teacher_apply, teacher_variables, teacher_sample = None, None, None
  if method.needs_teacher:
    teacher_apply, teacher_variables = teachers_lib.load_teachers(
        config, method, teacher_checkpoints, sample,
        model_kwargs=lambda name: _model_kwargs(name, parallel))
    teacher_sample, _ = teacher_apply(teacher_variables, sample, train=False)

  student_sample, _ = student_apply(student_variables, sample, train=False)
  method_params, method_state = method.init(method_rng, Batch(
      student=student_sample, teacher=teacher_sample, labels=np.zeros((2,), np.int32),
      where=np.ones((2,), bool), step=jnp.zeros((), jnp.int32)))
  optimizer = optimizer_lib.build_optimizer(config.optimizer, config.num_steps)
  host_state = jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=train_rng))

  fingerprint = config_fingerprint(config)
  identity = {"model": config.student.model, "method": config.method,
              "fingerprint": fingerprint}
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"),
                                             max_to_keep=config.keep_checkpoints)
  window = []  # Host metrics of the steps since the last log line.
  start_step = 0
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          host_state)

  def check_identity(step, meta):
    for key, value in identity.items():
      if meta.get(key) != value:
        raise checkpoint_lib.CheckpointError(
            f"The checkpoint in {checkpointer.directory!r} (step {step}) was written with "
            f"{key}={meta.get(key)!r}, but this run has {key}={value!r}. Use another workdir "
            "or delete that run directory.")

  latest, restored, meta = checkpointer.restore_latest_good(
      abstract, check_meta=check_identity,
      log=lambda message: print(f"[{name}] {message}", flush=True))
  if latest is not None:
    host_state = restored
    window = meta.get("window", [])
    start_step = int(host_state.step)
    print(f"[{name}] resumed from step {start_step}", flush=True)
  writer = metrics_lib.MetricWriter(run_dir, enabled=is_writer)
  # Lines logged after the restored step (or, with no checkpoint, any at all) are redone.
  writer.truncate_after(start_step)
  if is_writer:
    files.write_json_atomic(os.path.join(run_dir, "config.json"), json.loads(config.to_json()))

  state = parallel.put_replicated(host_state)
  teacher_on_device = (parallel.put_replicated(teacher_variables)
                       if teacher_variables is not None else None)
  train_step = parallel.compile_train_step(step_lib.make_train_step(
      student_apply=student_apply, teacher_apply=teacher_apply, method=method,
      optimizer=optimizer, reduce_gradients=parallel.reduce_gradients,
      skip_nonfinite=config.on_nonfinite == "skip"))
  eval_step = parallel.compile_eval_step(step_lib.make_eval_step(
      student_apply=student_apply, teacher_apply=teacher_apply if method.needs_teacher else None))

  def evaluate(state):
    return _evaluate(eval_step, state, teacher_on_device, parallel,
                     pipeline.eval_batches(config.eval_batch_size))

  def save(step, state, window):
    checkpointer.save(step, parallel.to_host(state),
                      dict(identity, window=window, skipped_steps=skipped_steps))

  progress = metrics_lib.Progress(name, config.num_steps, start_step,
                                  enabled=is_writer and config.progress)
  pending = []  # (step, device metrics) not yet copied to the host.
  timed_steps, timed_seconds, last_time, last_step = 0, 0.0, None, start_step
  skipped_steps = int(meta.get("skipped_steps", 0)) if meta else 0
  multi_host = jax.process_count() > 1
  with StopSignals() as stop:
    for step in range(start_step, config.num_steps):
      batch = parallel.put_batch(pipeline.train_batch(step))
      state, step_metrics = train_step(state, teacher_on_device, batch)
      pending.append((step + 1, step_metrics))
      done = step + 1
      is_log = done % config.log_every_steps == 0 or done == config.num_steps
      is_checkpoint = done % config.checkpoint_every_steps == 0 or done == config.num_steps
      # Every process must stop at the same step (its collectives and the checkpoint save
      # involve all of them), so on several hosts the signal is agreed at log boundaries.
      stopping = stop.received is not None
      if multi_host:
        stopping = is_log and _any_process(stopping)
      if is_log or is_checkpoint or stopping:
        for pending_step, device_metrics in pending:
          host = parallel_lib.metrics_to_host(parallel, device_metrics)
          bad = [k for k in ("loss", "grad_norm") if not np.isfinite(host[k])]
          if bad and config.on_nonfinite == "stop":
            latest_good = checkpointer.latest_step()
            raise NonFiniteLoss(
                f"[{name}] non-finite {', '.join(bad)} at step {pending_step} "
                f"({', '.join(f'{k}={host[k]}' for k in bad)}); " +
                (f"the last good checkpoint (step {latest_good}) is kept in "
                 f"{checkpointer.directory}." if latest_good is not None else
                 "no checkpoint had been written yet.") +
                " Set config.on_nonfinite='skip' to drop such steps instead.")
          skipped_steps += int(host.get("skipped_nonfinite", 0))
          window.append(host)
        pending = []
        now = time.perf_counter()
        if last_time is not None:  # The first interval includes compilation: not timed.
          timed_seconds += now - last_time
          timed_steps += done - last_step
        last_time, last_step = now, done
      if is_log:
        scalars = _mean_window(window)
        window = []
        examples_per_sec = (timed_steps * config.global_batch_size / timed_seconds
                            if timed_seconds else None)
        if examples_per_sec:
          scalars["examples_per_sec"] = examples_per_sec
        writer.write(done, "train", scalars)
        progress.update(done, scalars, examples_per_sec)
        last_train_scalars = scalars
      if stopping:  # Save before anything else: the grace period after SIGTERM is short.
        save(done, state, window)
        if done != config.num_steps:
          writer.close()
          checkpointer.close()
          raise Preempted(f"[{name}] received {stop.received or 'a stop signal on another host'}"
                          f": checkpoint written at step {done}; rerun the same command to "
                          "continue.")
      if done % config.eval_every_steps == 0 and done != config.num_steps:
        writer.write(done, "eval", evaluate(state))
        last_time = time.perf_counter()  # Evaluation is not training throughput.
      if is_checkpoint and not stopping:
        save(done, state, window)
        last_time = time.perf_counter()

  if start_step >= config.num_steps:  # Restored a finished run whose summary was lost.
    last_train_scalars = _last_logged(writer.path)
  final_eval = evaluate(state)
  writer.write(config.num_steps, "eval", final_eval)
  writer.close()
  summary = {
      "eval_accuracy": final_eval["accuracy"],
      "eval_cross_entropy": final_eval["cross_entropy"],
      "final_train_loss": last_train_scalars["loss"],
      "steps": int(config.num_steps),
      "train_examples_per_sec": (timed_steps * config.global_batch_size / timed_seconds
                                 if timed_seconds else float("nan")),
      "method": config.method,
      "student": config.student.model,
      "student_params": int(models_lib.count_params(host_state.params["student"])),
  }
  if config.on_nonfinite == "skip":
    summary["skipped_nonfinite_steps"] = skipped_steps
  if "teacher_agreement" in final_eval:
    summary["teacher_agreement"] = final_eval["teacher_agreement"]
    summary["teacher_eval_accuracy"] = final_eval["teacher_accuracy"]
  checkpointer.close()
  if is_writer:
    files.write_json_atomic(summary_path, summary)
  return summary


def _evaluate(eval_step, state, teacher_on_device, parallel, batches) -> dict:
  """Accuracy, cross-entropy and (with a teacher) agreement over the whole eval split."""
  totals = {}
  for batch in batches:
    sums = eval_step(state, teacher_on_device, parallel.put_batch(batch))
    for k, v in parallel_lib.metrics_to_host(parallel, sums).items():
      totals[k] = totals.get(k, 0.0) + v
  count = max(totals.pop("count"), 1.0)
  result = {"accuracy": totals["correct"] / count,
            "cross_entropy": totals["cross_entropy"] / count}
  if "teacher_agreement" in totals:
    result["teacher_agreement"] = totals["teacher_agreement"] / count
    result["teacher_accuracy"] = totals["teacher_correct"] / count
  return result


def _last_logged(metrics_path: str) -> dict:
  with open(metrics_path) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  return [l for l in lines if l["split"] == "train"][-1]
