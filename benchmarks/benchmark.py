r"""Times the jitted distillation train step on random CIFAR-shaped data.

    python -m benchmarks.benchmark --student=resnet8x4 --teacher=resnet32x4 \
        --num_classes=100 --batch_size=32 --steps=10 --method=kd [--reference=torch]

The step is kdjax's real train step (teacher forward in eval mode, student forward/backward,
method loss, SGD update) compiled by the configured parallel strategy. Timing starts after a
warm-up (compilation) and blocks on the results. With `--reference=torch` the PyTorch reference
of the same two models and loss (benchmarks/torch_reference.py) is timed in the same
invocation, interleaved with the JAX runs over `--rounds` rounds, and the best of each is
compared. The last line printed is one JSON object (stdout); while it works, a progress line
per phase (building, compiling, each timing round, with the time so far and an estimate of
what is left) goes to stderr, unless `--quiet`.

    python -m benchmarks.benchmark --teacher_cache --cache_topk=10 --rounds=5

times, interleaved, the same KD step three ways: the teacher run live, the teacher's outputs
read from the batch (a run with `config.teacher.cache`, experiments/cache_teacher.py), and
the student alone (scratch).
"""

import importlib.util
import json
import sys
import time

from absl import flags, logging

from experiments import cli
from benchmarks.synthetic_step import build_synthetic_step

flags.DEFINE_string("student", "resnet8x4", "Student model name.")
flags.DEFINE_string("teacher", "resnet32x4", "Teacher model name.")
flags.DEFINE_integer("num_classes", 100, "Number of classes.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (compilation).")
flags.DEFINE_integer("rounds", 1, "Timing rounds (best is reported); interleaved with torch.")
flags.DEFINE_string("method", "kd", "Distillation method.")
flags.DEFINE_string("parallel", "jit", "jit | pmap.")
flags.DEFINE_enum("reference", "none", ["none", "torch"], "Also time the PyTorch reference.")
flags.DEFINE_bool("teacher_cache", False, "Time the --method step three ways, interleaved: "
                  "live (teacher run), cached (teacher outputs read from the batch, as with "
                  "config.teacher.cache) and the student alone (scratch).")
flags.DEFINE_integer("cache_topk", 0, "With --teacher_cache: cached top-k logits (0: all).")
flags.DEFINE_bool("quiet", False, "No progress lines on stderr; only the JSON result.")
FLAGS = flags.FLAGS


class Progress:
  """Progress lines on stderr: `[benchmark 12s] what (ETA 30s)`; silent with --quiet."""

  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self, message: str, *, remaining_s=None):
    if FLAGS.quiet:
      return
    eta = f" (ETA {remaining_s:.0f}s)" if remaining_s is not None else ""
    print(f"[benchmark {time.perf_counter() - self.start:.0f}s] {message}{eta}", file=sys.stderr,
          flush=True)


def timed_rounds(runs: dict, progress: Progress) -> dict:
  """{name: [seconds of --steps steps per round]}: the runs interleaved over --rounds, after
  --warmup steps each; a progress line per round with an estimate of the rounds left."""
  for name, run in runs.items():
    progress(f"{name}: compiling and warming up ({FLAGS.warmup} steps)")
    run(FLAGS.warmup)
  times = {name: [] for name in runs}
  for round_index in range(FLAGS.rounds):
    started = time.perf_counter()
    for name, run in runs.items():
      times[name].append(run(FLAGS.steps))
    took = time.perf_counter() - started
    summary = ", ".join(f"{n} {1000 * t[-1] / FLAGS.steps:.1f} ms a step"
                        for n, t in times.items())
    progress(f"round {round_index + 1}/{FLAGS.rounds}: {summary}",
             remaining_s=took * (FLAGS.rounds - round_index - 1))
  return times


def build_jax_step(student_name, teacher_name, num_classes, batch_size, method_name, parallel):
  """Returns (run(n) -> seconds, student_params, teacher_params, jax)."""
  step = build_synthetic_step(student_name, teacher_name, num_classes=num_classes,
                              batch_size=batch_size, method_name=method_name, parallel=parallel)
  return step.run, step.student_params, step.teacher_params, step.jax


def _check_flags():
  """Every mistake in one line before anything is compiled."""
  from kdjax import methods, models
  from kdjax.names import did_you_mean
  from kdjax.train import parallel as parallel_lib
  for flag, name, valid in (("--student", FLAGS.student, models.MODELS),
                            ("--teacher", FLAGS.teacher, models.MODELS),
                            ("--method", FLAGS.method, methods.METHODS),
                            ("--parallel", FLAGS.parallel, parallel_lib.PARALLEL_KINDS)):
    if name not in valid:
      cli.fail(f"{flag}={name!r} is not valid{did_you_mean(name, valid)}; valid values: "
               f"{', '.join(sorted(valid))}.")
  for flag in ("num_classes", "batch_size", "steps", "rounds"):
    if FLAGS[flag].value <= 0:
      cli.fail(f"--{flag} must be a positive integer, got {FLAGS[flag].value}.")
  if FLAGS.cache_topk < 0 or FLAGS.cache_topk > FLAGS.num_classes:
    cli.fail(f"--cache_topk must be in [0, --num_classes={FLAGS.num_classes}], got "
             f"{FLAGS.cache_topk}.")
  if FLAGS.teacher_cache and FLAGS.reference != "none":
    cli.fail("--teacher_cache and --reference time different things; give one of them.")
  if FLAGS.warmup < 0:
    cli.fail(f"--warmup must be >= 0, got {FLAGS.warmup}.")
  if FLAGS.reference == "torch" and importlib.util.find_spec("torch") is None:
    cli.fail("--reference=torch needs PyTorch, which is not installed; install it with "
             "`pip install -e \".[torch]\"` (a CPU wheel, torch==2.13.0) or drop --reference.")


def _cached_outputs(host_batch: dict, num_classes: int, topk: int, seed: int = 0) -> dict:
  """Cached-teacher batch entries of the shapes a cache holds (random values: only the time
  of the step is measured)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  batch = len(host_batch["labels"])
  logits = np.random.default_rng(seed).normal(size=(batch, num_classes)).astype(np.float32)
  if not topk or topk >= num_classes:
    return {"teacher_logits": logits}
  order = np.argsort(-logits, axis=-1)[:, :topk].astype(np.int32)
  return {"teacher_topk_logits": np.take_along_axis(logits, order, -1),
          "teacher_topk_indices": order}


def teacher_cache_main():
  """Live vs cached vs student-only step, interleaved over --rounds; prints one JSON line."""
  from benchmarks.synthetic_step import build_synthetic_step  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_classes=FLAGS.num_classes, batch_size=FLAGS.batch_size,
                parallel=FLAGS.parallel)
  live = build_synthetic_step(FLAGS.student, FLAGS.teacher, method_name=FLAGS.method, **kwargs)
  scratch = build_synthetic_step(FLAGS.student, FLAGS.teacher, method_name="scratch", **kwargs)
  cached_batch = live.put_batch(dict(live.host_batch, **_cached_outputs(
      live.host_batch, FLAGS.num_classes, FLAGS.cache_topk)))
  runs = {"live": live.run, "cached": lambda n: live.run(n, cached_batch), "scratch": scratch.run}
  times = timed_rounds(runs, Progress())
  step_ms = {name: 1000 * min(t) / FLAGS.steps for name, t in times.items()}
  jax = live.jax
  print(json.dumps({
      **{f"{name}_step_ms": ms for name, ms in step_ms.items()},
      **{f"{name}_examples_per_sec": FLAGS.batch_size / ms * 1000 for name, ms in step_ms.items()},
      "cached_over_scratch": step_ms["cached"] / step_ms["scratch"],
      "live_over_cached": step_ms["live"] / step_ms["cached"],
      "method": FLAGS.method, "student": FLAGS.student, "teacher": FLAGS.teacher,
      "cache_topk": FLAGS.cache_topk or FLAGS.num_classes, "batch_size": FLAGS.batch_size,
      "steps": FLAGS.steps, "rounds": FLAGS.rounds, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count()}))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  _check_flags()
  if FLAGS.teacher_cache:
    teacher_cache_main()
    return
  progress = Progress()
  progress(f"building the {FLAGS.method} step: {FLAGS.teacher} -> {FLAGS.student}, batch "
           f"{FLAGS.batch_size}, {FLAGS.parallel}")
  run, student_params, teacher_params, jax = build_jax_step(
      FLAGS.student, FLAGS.teacher, FLAGS.num_classes, FLAGS.batch_size, FLAGS.method,
      FLAGS.parallel)
  runs = {"kdjax": run}
  if FLAGS.reference == "torch":
    from benchmarks import torch_reference
    progress("building the PyTorch reference")
    runs["torch"] = torch_reference.make_timed_runner(
        FLAGS.student, FLAGS.teacher, FLAGS.num_classes, FLAGS.batch_size)
  times = timed_rounds(runs, progress)
  jax_times, torch_times = times["kdjax"], times.get("torch", [])
  result = {
      "examples_per_sec": FLAGS.batch_size * FLAGS.steps / min(jax_times),
      "step_ms": 1000 * min(jax_times) / FLAGS.steps,
      "student_params": int(student_params),
      "teacher_params": int(teacher_params),
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "method": FLAGS.method,
      "parallel": FLAGS.parallel,
      "batch_size": FLAGS.batch_size,
      "steps": FLAGS.steps,
      "rounds": FLAGS.rounds,
  }
  if torch_times:
    import torch
    result["torch_examples_per_sec"] = FLAGS.batch_size * FLAGS.steps / min(torch_times)
    result["torch_threads"] = torch.get_num_threads()
    result["speedup_vs_torch"] = result["examples_per_sec"] / result["torch_examples_per_sec"]
  print(json.dumps(result))


if __name__ == "__main__":
  cli.run(main, config_name=None)
