"""One training run: student (and its method) trained against a fixed teacher.

    summary = train_and_evaluate(config, run_dir, teacher_checkpoints=[...])

Resumes from the latest checkpoint in `run_dir/checkpoints`; a finished run (with
`run_dir/run_summary.json`) is not retrained. SIGTERM / SIGINT write a checkpoint at the next
step boundary and raise `Preempted`; rerunning the same command continues.

The parts are built by `run_setup.build_run`; the loop's decisions (log / evaluate / save)
are `bookkeeping.itstime`; its metrics and throughput are `bookkeeping.MetricsWindow` and
`bookkeeping.Throughput`. This file holds the order in which they happen. With
`config.steps_per_call` = K (device batches), one call runs K steps (`parallel.repeat_step`)
and everything above happens between calls.
"""

import contextlib
import json
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import models as models_lib
from kdjax import paths, signals
from kdjax.data.device_batches import DeviceBatches
from kdjax.data.prefetch import Prefetcher
from kdjax.methods import base as method_base, eval_metrics
from kdjax.signals import Preempted
from kdjax.train import checkpoint as checkpoint_lib
from kdjax.train import files, metrics as metrics_lib
from kdjax.train import parallel as parallel_lib, step as step_lib
from kdjax.train import provenance
from kdjax.train.bookkeeping import MetricsWindow, Throughput, call_length, itstime
from kdjax.train.config_paths import resolve_config_paths
from kdjax.train.run_dir import check_run_dir, config_fingerprint
from kdjax.train.plan import RunPlan
from kdjax.train.run_setup import RunParts, build_run
from kdjax.train.state import student_variables
from kdjax.train.validate import validate_config

RUN_SUMMARY = "run_summary.json"


class NonFiniteLoss(FloatingPointError):
  pass


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def train_and_evaluate(config: ml_collections.ConfigDict, run_dir: str, *,
                       teacher_checkpoints: Sequence[str] = (), name: str = "run") -> dict:
  """Trains `config.student.model` with `config.method`; returns the run summary.

  Args:
    config: the experiment config of this one run (checked here, once: paths, fields,
      teacher; then read through its `RunPlan`).
    run_dir: the run's directory (checkpoints, metrics, summary).
    teacher_checkpoints: the checkpoints/ directories of the teachers of
      `config.teacher.model` then `config.teacher.extra`, in that order, if the method needs a
      teacher (ensemble methods use all of them, the others the first).
    name: the run's name in progress lines.
  """
  config = resolve_config_paths(config)
  if isinstance(teacher_checkpoints, str):
    teacher_checkpoints = [teacher_checkpoints]
  teacher_checkpoints = [paths.resolve(directory) for directory in teacher_checkpoints]
  plan = validate_config(config, num_devices=jax.device_count())
  if (plan.method.teacher_needs.checkpoint and not teacher_checkpoints and
      not config.teacher.get("cache") and not config.teacher.get("pretrained")):
    raise checkpoint_lib.CheckpointError(
        f"Method {config.method!r} needs a teacher; set config.teacher.checkpoint or put "
        "'teacher' first in config.suite.")
  return train_checked_run(plan, paths.resolve(run_dir),
                           teacher_checkpoints=teacher_checkpoints, name=name)


def train_checked_run(plan: RunPlan, run_dir: str, *, teacher_checkpoints: Sequence[str],
                      name: str) -> dict:
  """`train_and_evaluate` for a run already checked (its `RunPlan`; a suite's `SuitePlan`
  checks every run once, before the first starts)."""
  config = plan.config
  check_run_dir(config, run_dir, name)
  summary_path = os.path.join(run_dir, RUN_SUMMARY)
  if os.path.exists(summary_path):
    if jax.process_index() == 0 and config.progress:
      print(f"[{name}] finished earlier ({summary_path}); skipped. Delete {run_dir} to train "
            "it again.", flush=True)
    return files.read_json(summary_path)
  run = _Run(config, run_dir, name, build_run(plan, teacher_checkpoints))
  try:
    last_train_scalars, throughput = run.train()
    summary = run.summarize(last_train_scalars, throughput)
  finally:
    run.close()
  if run.is_writer:
    files.write_json_atomic(summary_path, summary)
  return summary


class _Run:
  """One run's state on device, its checkpointer and writers, restored on construction."""

  def __init__(self, config, run_dir: str, name: str, parts: RunParts):
    self.config, self.name, self.parts, self.run_dir = config, name, parts, run_dir
    self.is_writer = jax.process_index() == 0
    self.identity = {"model": config.student.model, "method": config.method,
                     "fingerprint": config_fingerprint(config)}
    self.checkpointer = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"),
                                                    max_to_keep=config.keep_checkpoints)
    host_state, self.metrics = self._restore()
    self.start_step = int(host_state.step)
    self.student_params = int(models_lib.count_params(host_state.params["student"]))
    self.writer = metrics_lib.MetricWriter(run_dir, enabled=self.is_writer)
    # Lines logged after the restored step (or, with no checkpoint, any at all) are redone.
    # A run restored at its last step (its summary lost) evaluates again: drop that evaluation.
    self.writer.truncate_after(self.start_step,
                               keep_evaluations=self.start_step < config.num_steps)
    if self.is_writer:
      files.write_json_atomic(os.path.join(run_dir, "config.json"),
                              json.loads(config.to_json()))

    parallel = parts.parallel
    self.state = parallel.put_state(host_state)
    self.teacher_variables = (parallel.put_teacher(parts.teacher_variables)
                              if parts.teacher_variables is not None else None)
    # config.device_batches: the step makes its batch from the dataset on the devices.
    # config.steps_per_call (with device batches): one call runs that many steps.
    self.steps_per_call = config.get("steps_per_call", 1)
    self.device_batches = (
        DeviceBatches(parts.pipeline, put=parallel.put_replicated, num_steps=config.num_steps,
                      steps_per_call=self.steps_per_call)
        if config.get("device_batches", False) else None)
    self._pure_train_step = step_lib.make_train_step(
        student_apply=parts.student_apply, teacher=parts.teacher,
        method=parts.method, optimizer=parts.optimizer,
        reduce_gradients=parallel.reduce_gradients,
        skip_nonfinite=config.on_nonfinite == "skip")
    self._train_steps = {}  # Steps per call -> the compiled function.
    self.eval_step = parallel.compile_eval_step(step_lib.make_eval_step(
        student_apply=parts.student_apply,
        teacher=parts.eval_teacher,
        metrics=tuple(eval_metrics.CLASSIFICATION_METRICS) + tuple(parts.method.eval_metrics())))

  def train_steps(self, num_steps: int):
    """The compiled function running `num_steps` steps a call (1: the plain step). Calls of
    fewer than `config.steps_per_call` steps (the end of a run, or a resume between two
    calls' boundaries) compile once more."""
    if num_steps not in self._train_steps:
      self._train_steps[num_steps] = self.parts.parallel.compile_train_step(
          self._pure_train_step, steps_per_call=num_steps,
          **({"make_batch": self.device_batches.make_batch} if self.device_batches else {}))
    return self._train_steps[num_steps]

  def _restore(self):
    """The newest good checkpoint's state and metrics window, or the initial state."""
    initial = self.parts.initial_state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            initial)
    step, restored, meta = self.checkpointer.restore_latest_good(
        abstract, check_meta=self._check_identity,
        log=lambda message: print(f"[{self.name}] {message}", flush=True))
    if step is None:
      return initial, MetricsWindow(self.parts.parallel)
    print(f"[{self.name}] resumed from step {int(restored.step)}", flush=True)
    return restored, MetricsWindow(self.parts.parallel, meta.get("window", []),
                                   int(meta.get("skipped_steps", 0)))

  def _check_identity(self, step, meta):
    for key, value in self.identity.items():
      if meta.get(key) != value:
        raise checkpoint_lib.CheckpointError(
            f"The checkpoint in {self.checkpointer.directory!r} (step {step}) was written with "
            f"{key}={meta.get(key)!r}, but this run has {key}={value!r}. Use another workdir "
            "or delete that run directory.")

  def save(self, step: int):
    self.checkpointer.save(step, self.parts.parallel.to_host(self.state),
                           dict(self.identity, num_steps=self.config.num_steps,
                                window=self.metrics.window,
                                skipped_steps=self.metrics.skipped_steps))

  @property
  def selection_split(self) -> str:
    """Where periodic evaluations (and the best step) are measured: the held-out validation
    examples when `config.validation_examples` > 0, else the eval split."""
    return "validation" if self.config.validation_examples else "eval"

  def evaluate(self, split: str = "eval") -> dict:
    """Every eval metric's average over the whole eval (or validation) split."""
    parallel, totals = self.parts.parallel, {}
    for batch in self.parts.pipeline.eval_batches(self.config.eval_batch_size, split=split):
      sums = self.eval_step(self.state, self.teacher_variables, parallel.put_batch(batch))
      for k, v in parallel_lib.metrics_to_host(parallel, sums).items():
        totals[k] = totals.get(k, 0.0) + v
    count = max(totals.pop("count"), 1.0)
    return {name: total / count for name, total in totals.items()}

  def _stop_on_nonfinite(self, step: int, bad, host: dict):
    if self.config.on_nonfinite != "stop":
      return
    latest_good = self.checkpointer.latest_step()
    raise NonFiniteLoss(
        f"[{self.name}] non-finite {', '.join(bad)} at step {step} "
        f"({', '.join(f'{k}={host[k]}' for k in bad)}); " +
        (f"the last good checkpoint (step {latest_good}) is kept in "
         f"{self.checkpointer.directory}." if latest_good is not None else
         "no checkpoint had been written yet.") +
        " Set config.on_nonfinite='skip' to drop such steps instead.")

  def train(self):
    """The step loop. Returns (the last logged train scalars or None, Throughput)."""
    c, parallel = self.config, self.parts.parallel
    progress = metrics_lib.Progress(self.name, c.num_steps, self.start_step,
                                    enabled=self.is_writer and c.progress)
    throughput = Throughput(c.global_batch_size, self.start_step)
    last_train_scalars = None
    multi_host = jax.process_count() > 1
    # Batches step+1..step+prefetch are prepared and put on the devices while step runs; or,
    # with config.device_batches, the step makes batch `step` itself from `batches.get(step)`.
    batch_source = (contextlib.nullcontext(self.device_batches) if self.device_batches else
                    Prefetcher(self.parts.pipeline.train_batch, put=parallel.put_batch,
                               start=self.start_step, stop=c.num_steps,
                               depth=c.get("prefetch", 0)))
    per_call = self.steps_per_call
    # A stop signal inside only sets a flag, read at step boundaries (`kdjax.signals`).
    with signals.deferred(), batch_source as batches:
      step = self.start_step
      while step < c.num_steps:
        # The log, eval and checkpoint intervals are multiples of steps_per_call (`validate`),
        # so their steps end calls.
        num = call_length(step, c.num_steps, per_call)
        batch = batches.get(step, num) if num > 1 else batches.get(step)
        compiles = num not in self._train_steps
        self.state, step_metrics = self.train_steps(num)(self.state, self.teacher_variables,
                                                         batch)
        done = step = step + num
        if compiles:  # A new call length mid-run (a shorter last call, a resume's realigning
          # call): its compilation is not training throughput.
          jax.block_until_ready(self.state)
          throughput.restart(done)
        self.metrics.add(done, step_metrics, num)
        is_log = itstime(done, c.log_every_steps, c.num_steps)
        is_checkpoint = itstime(done, c.checkpoint_every_steps, c.num_steps)
        # Every process must stop at the same step (its collectives and the checkpoint save
        # involve all of them), so on several hosts the signal is agreed at log boundaries.
        stopping = signals.received() is not None
        if multi_host:
          stopping = is_log and _any_process(stopping)
        if is_log or is_checkpoint or stopping:
          self.metrics.flush(self._stop_on_nonfinite)
          throughput.mark(done)
        if is_log:
          scalars = self.metrics.take_mean()
          if throughput.examples_per_sec:
            scalars["examples_per_sec"] = throughput.examples_per_sec
          self.writer.write(done, "train", scalars)
          progress.update(done, scalars, throughput.examples_per_sec)
          last_train_scalars = scalars
        if stopping:  # Save before anything else: the grace period after SIGTERM is short.
          self.save(done)
          if done != c.num_steps:
            raise Preempted(
                f"[{self.name}] received {signals.received() or 'a stop signal on another host'}"
                f": checkpoint written at step {done}; rerun the same command to continue.",
                signal_name=signals.received())
        if done % c.eval_every_steps == 0 and done != c.num_steps:
          evaluation = self.evaluate(self.selection_split)
          self.writer.write(done, self.selection_split, evaluation)
          # DistiLLM's adaptive schedule (no host round trip for methods without one).
          if method_base.overrides(self.parts.method, "after_evaluation"):
            self.update_method_state(evaluation)
          throughput.exclude_since_mark()  # Evaluation is not training throughput.
        if is_checkpoint and not stopping:
          self.save(done)
          throughput.exclude_since_mark()
    return last_train_scalars, throughput

  def summarize(self, last_train_scalars: Optional[dict], throughput: Throughput) -> dict:
    c = self.config
    if last_train_scalars is None:  # Restored a finished run whose summary was lost.
      last_train_scalars = _last_logged(self.run_dir)
    final_eval = self.evaluate()
    self.writer.write(c.num_steps, "eval", final_eval)
    split = self.selection_split
    final_selection = final_eval if split == "eval" else self.evaluate(split)
    if split != "eval":
      self.writer.write(c.num_steps, split, final_selection)
    # Only process 0 writes metrics.jsonl; elsewhere the final evaluation stands alone.
    best_step, best_accuracy = best_eval(
        (metrics_lib.read_metrics(self.run_dir) if self.is_writer else []) +
        [dict(final_selection, split=split, step=c.num_steps)], split=split)
    summary = {
        "eval_accuracy": final_eval["accuracy"],  # Last step's (the run's result).
        # Over every evaluation: mdistiller's tables report the best test epoch; with a
        # held-out validation set, the step it selects (and its validation accuracy).
        f"best_{split}_accuracy": best_accuracy,
        f"best_{split}_step": best_step,
        "eval_cross_entropy": final_eval["cross_entropy"],
        "final_train_loss": last_train_scalars["loss"],
        "steps": int(c.num_steps),
        "train_examples_per_sec": throughput.examples_per_sec or float("nan"),
        "method": c.method,
        "student": c.student.model,
        "student_params": self.student_params,
    }
    if c.on_nonfinite == "skip":
      summary["skipped_nonfinite_steps"] = self.metrics.skipped_steps
    if "teacher_agreement" in final_eval:
      summary["teacher_agreement"] = final_eval["teacher_agreement"]
      summary["teacher_eval_accuracy"] = final_eval["teacher_accuracy"]
    if "teacher_cross_entropy" in final_eval:
      summary["teacher_eval_cross_entropy"] = final_eval["teacher_cross_entropy"]
    for name, value in final_eval.items():  # A method's own metrics (per-exit accuracy, ...).
      if name not in ("accuracy", "cross_entropy", "teacher_agreement", "teacher_accuracy",
                      "teacher_cross_entropy"):
        summary[f"eval_{name}"] = value
    if self.parts.plan.language_model:
      summary.update(self.language_model_metrics(final_eval))
    summary.update(self.parts.method.final_metrics(  # Sample quality and the like.
        self.parts.student_apply, student_variables(self.state)))
    summary["provenance"] = provenance.run_provenance(self.parts.pipeline, c)
    if self.parts.teacher_checkpoints:  # Which teacher, at which step, with which weights.
      summary["provenance"]["teachers"] = provenance.teacher_provenance(
          self.parts.teacher_checkpoints)
    return summary

  def update_method_state(self, evaluation: dict):
    """`Method.after_evaluation` on the host copy of the method state, then back on device."""
    parallel = self.parts.parallel
    host = parallel.to_host(self.state)
    method_state = self.parts.method.after_evaluation(host.method_state, evaluation)
    self.state = parallel.put_state(host.replace(method_state=jax.tree.map(
        lambda new, old: np.asarray(new, np.asarray(old).dtype), method_state,
        host.method_state)))

  def language_model_metrics(self, final_eval: dict) -> dict:
    """Perplexities (exp of the per-token cross-entropy) and the decoding metrics of
    `kdjax.lm.evaluation` (speculative decoding with the student as the teacher's draft)."""
    metrics = {"eval_perplexity": math.exp(final_eval["cross_entropy"])}
    if "teacher_cross_entropy" in final_eval:
      metrics["teacher_eval_perplexity"] = math.exp(final_eval["teacher_cross_entropy"])
    if not self.config.lm.eval_prompts:
      return metrics
    from kdjax.lm import evaluation  # pylint: disable=g-import-not-at-top
    # The speculative target is the run's one loaded teacher (not a self-teacher or an ensemble).
    teacher = self.parts.eval_teacher
    student_vars = self.parts.parallel.to_host(student_variables(self.state))
    has_teacher = (teacher.source == "checkpoint" and teacher.apply is not None and
                   self._same_vocabulary(teacher, student_vars))
    announce = self.is_writer and bool(self.config.get("progress", True))
    if announce:  # Minutes on a CPU for a large model: say what is running.
      print(f"[{self.name}] decoding evaluation: {self.config.lm.eval_prompts} prompts, "
            f"{self.config.lm.eval_new_tokens} new tokens"
            f"{', speculative with the teacher' if has_teacher else ''} ...", flush=True)
    started = time.perf_counter()
    metrics.update(evaluation.generation_metrics(
        student_apply=self.parts.student_apply,
        student_variables=student_vars,
        teacher_apply=teacher.apply if has_teacher else None,
        teacher_variables=self.parts.teacher_variables if has_teacher else None,
        pipeline=self.parts.pipeline, lm_config=self.config.lm, seed=self.config.seed))
    if announce:
      print(f"[{self.name}] decoding evaluation done in {time.perf_counter() - started:.1f}s",
            flush=True)
    return metrics

  def _same_vocabulary(self, teacher, student_vars) -> bool:
    """Speculative decoding drafts the teacher's tokens with the student: one vocabulary.
    (`uld` distils across vocabularies; its runs skip the speculative metrics.)"""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    student = jax.eval_shape(lambda v, x: self.parts.student_apply(v, x, train=False)[0].logits,
                             student_vars, tokens)
    teacher_logits = jax.eval_shape(lambda v, x: teacher.run(v, x).logits,
                                    self.parts.teacher_variables, tokens)
    return student.shape[-1] == teacher_logits.shape[-1]

  def close(self):
    self.writer.close()
    self.checkpointer.close()


def best_eval(lines, split: str = "eval") -> tuple:
  """(step, accuracy) of the best evaluation of `split` among metrics.jsonl lines (the
  earliest on ties); lines after a resumed checkpoint were dropped, so a resumed run counts
  each step once."""
  evals = [l for l in lines if l["split"] == split]
  best = max(evals, key=lambda l: (l["accuracy"], -l["step"]))
  return int(best["step"]), float(best["accuracy"])


def _last_logged(run_dir: str) -> dict:
  return [l for l in metrics_lib.read_metrics(run_dir) if l["split"] == "train"][-1]
