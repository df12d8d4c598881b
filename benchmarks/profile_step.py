r"""Where the time of the CPU KD train step goes, and what cheap changes buy.

    python -m benchmarks.profile_step --mode=profile --batch_size=32
    python -m benchmarks.profile_step --mode=compare --rounds=5 \
        --variants=baseline,folded_teacher,no_eigen_threads

`--mode=profile` runs kdjax's KD train step (`--teacher` in eval mode, `--student` forward and
backward, KD loss, SGD with momentum and weight decay: the step `benchmarks.benchmark` times)
under `jax.profiler.trace` (trace kept in `--trace_dir`, a temp dir by default), reads the
executed XLA thunks from the Perfetto trace and attributes each to a phase and a kind from the
compiled HLO's metadata:

- phase: `teacher fwd` (model ops outside the gradient), `student fwd` (`jvp(...)` in the
  op name), `student bwd` (`transpose(jvp(...))`), `loss+update` (ops outside any module:
  the KD loss and the SGD update);
- kind: `conv` (a convolution, or a fusion that holds one), `dot`, `batchnorm` (ops of a
  BatchNorm module, by its Flax path), `elementwise/other`.

With `--reference=torch` (default) the PyTorch reference step (benchmarks/torch_reference.py,
the same models, loss and optimizer) runs under `torch.profiler.profile` and its operators'
self CPU time is split the same way. Both tables give milliseconds per step.

`--mode=compare` times variants of the JAX step, each in its own worker process (XLA flags
and thread settings are fixed when a process starts), interleaved over `--rounds` rounds of
`--steps` steps, best of each, as a ratio to `baseline` measured in the same invocation. Every
variant starts from the same initial state and batch; the first step's loss and the loss after
all steps are compared to the baseline's (relative difference). Variants: see `VARIANTS`.
The last line printed is one JSON object.
"""

import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional

from absl import flags, logging

from experiments import cli

# name -> (extra XLA_FLAGS, environment variables, fold the teacher's BatchNorm, CPU cores)
VARIANTS = {
    "baseline": ("", {}, False, None),
    "folded_teacher": ("", {}, True, None),
    # XLA:CPU's Eigen convolutions on one thread instead of the intra-op pool.
    "no_eigen_threads": ("--xla_cpu_multi_thread_eigen=false", {}, False, None),
    # The legacy (non-thunk) CPU runtime: jaxlib 0.10.2 warns that the flag "is no longer
    # supported" and keeps the thunk runtime, so this measures noise against baseline.
    "no_thunk_runtime": ("--xla_cpu_use_thunk_runtime=false", {}, False, None),
    "onednn": ("--xla_cpu_use_onednn=true", {}, False, None),
    "no_xnnpack": ("--xla_cpu_use_xnnpack=false", {}, False, None),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}, False, None),
    "one_core": ("", {}, False, 1),  # The process pinned to one core (sched_setaffinity).
    "folded_teacher+no_eigen_threads": ("--xla_cpu_multi_thread_eigen=false", {}, True, None),
}

flags.DEFINE_enum("mode", "profile", ["profile", "compare"], "What to do (see above).")
flags.DEFINE_string("student", "resnet8x4", "Student model name.")
flags.DEFINE_string("teacher", "resnet32x4", "Teacher model name.")
flags.DEFINE_integer("num_classes", 100, "Number of classes.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("steps", 5, "Steps per timed round (compare) or traced steps (profile).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds in --mode=compare (best is kept).")
flags.DEFINE_list("variants", ["baseline", "folded_teacher", "no_eigen_threads"],
                  "Variants for --mode=compare; the first must be baseline.")
flags.DEFINE_bool("fold_teacher", False, "--mode=profile: profile the folded-BN teacher step.")
flags.DEFINE_enum("reference", "torch", ["none", "torch"],
                  "--mode=profile: also profile the PyTorch reference step.")
flags.DEFINE_string("trace_dir", "", "--mode=profile: where the JAX trace goes (default: a "
                    "new temp dir).")
flags.DEFINE_string("worker", "", "Internal: run as the worker of this variant.")
FLAGS = flags.FLAGS


# --- the step ----------------------------------------------------------------------------


def build_step(student_name: str, teacher_name: str, num_classes: int, batch_size: int,
               fold_teacher: bool, seed: int = 0):
  """(jitted step, state, teacher variables, batch) of the KD step as a run builds it.

  The random teacher's BatchNorm statistics are calibrated on the batch (as a trained
  teacher's match its data), so that folding them is not the trivial identity.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kdjax import methods, models  # pylint: disable=g-import-not-at-top
  from kdjax.methods.base import Batch  # pylint: disable=g-import-not-at-top
  from kdjax.models.fold import fold_batch_norm  # pylint: disable=g-import-not-at-top
  from kdjax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from kdjax.train import parallel as parallel_lib  # pylint: disable=g-import-not-at-top
  from kdjax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  from benchmarks.teacher_benchmark import calibrate_batch_stats  # pylint: disable=g-import-not-at-top

  parallel = parallel_lib.get_parallel("jit")
  student = models.get_model(student_name, num_classes=num_classes)
  teacher = models.get_model(teacher_name, num_classes=num_classes)
  sample = jnp.zeros((2, 32, 32, 3))
  student_variables = models.init_variables(student, jax.random.key(seed), sample)
  teacher_variables = models.init_variables(teacher, jax.random.key(seed + 1), sample)
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
  teacher_variables = calibrate_batch_stats(teacher, teacher_variables, inputs)
  teacher_apply = models.apply_fn(teacher)
  if fold_teacher:
    teacher_apply, teacher_variables = fold_batch_norm(teacher, teacher_variables, inputs)
  method_class = methods.get_method_class("kd")
  method = method_class(method_class.default_config())
  student_apply = models.apply_fn(student)
  s_out, _ = student_apply(student_variables, sample, train=False)
  t_out, _ = teacher_apply(teacher_variables, sample, train=False)
  method_params, method_state = method.init(jax.random.key(seed + 2), Batch(
      s_out, t_out, jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool), jnp.zeros((), jnp.int32),
      rng=jax.random.key(seed + 3), data={"index": jnp.arange(2, dtype=jnp.int32)},
      teacher_variables=teacher_variables))
  optimizer = optimizer_lib.build_optimizer(ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.05, schedule="constant", warmup_steps=0, weight_decay=5e-4,
      momentum=0.9, nesterov=False)), 1000)
  state = parallel.put_replicated(jax.device_get(state_lib.create(
      student_variables=student_variables, method_params=method_params,
      method_state=method_state, optimizer=optimizer, rng=jax.random.PRNGKey(seed))))
  train_step = parallel.compile_train_step(step_lib.make_train_step(
      student_apply=student_apply, teacher_apply=teacher_apply, method=method,
      optimizer=optimizer))
  batch = parallel.put_batch({
      "inputs": inputs,
      "labels": rng.integers(0, num_classes, size=(batch_size,)).astype(np.int32),
      "index": np.arange(batch_size, dtype=np.int32)})
  return train_step, state, parallel.put_replicated(jax.device_get(teacher_variables)), batch


# --- compare: one worker process per variant ---------------------------------------------------


def _worker(variant: str):
  """Reads `run N` / `quit` lines; answers each with one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  _, _, fold, _ = VARIANTS[variant]
  step, state, teacher_variables, batch = build_step(
      FLAGS.student, FLAGS.teacher, FLAGS.num_classes, FLAGS.batch_size, fold)
  losses = []
  state, metrics = step(state, teacher_variables, batch)
  losses.append(float(metrics["loss"]))
  for _ in range(FLAGS.warmup - 1):
    state, metrics = step(state, teacher_variables, batch)
  jax.block_until_ready(state)
  print(json.dumps({"ready": True, "first_loss": losses[0]}), flush=True)
  for line in sys.stdin:
    command = line.split()
    if command[0] == "quit":
      break
    start = time.perf_counter()
    for _ in range(int(command[1])):
      state, metrics = step(state, teacher_variables, batch)
    jax.block_until_ready((state, metrics))
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "loss": float(metrics["loss"])}), flush=True)


def _start_worker(variant: str) -> subprocess.Popen:
  xla_flags, env_vars, _, cores = VARIANTS[variant]
  env = dict(os.environ, **env_vars)
  env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags) if f)
  command = [sys.executable, "-m", "benchmarks.profile_step", f"--worker={variant}",
             f"--student={FLAGS.student}", f"--teacher={FLAGS.teacher}",
             f"--num_classes={FLAGS.num_classes}", f"--batch_size={FLAGS.batch_size}",
             f"--warmup={FLAGS.warmup}"]
  preexec = None
  if cores:
    preexec = lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
  return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                          text=True, preexec_fn=preexec)


def _ask(worker: subprocess.Popen, variant: str, command: Optional[str] = None) -> dict:
  if command:
    worker.stdin.write(command + "\n")
    worker.stdin.flush()
  line = worker.stdout.readline()
  if not line:
    raise RuntimeError(f"variant {variant!r}: the worker exited (exit status "
                       f"{worker.wait()}); its XLA flags may not exist in this jaxlib.")
  return json.loads(line)


def compare_main():
  workers, first_loss = {}, {}
  try:
    for variant in FLAGS.variants:  # One at a time: compilations do not overlap.
      workers[variant] = _start_worker(variant)
      first_loss[variant] = _ask(workers[variant], variant)["first_loss"]
    times = {v: [] for v in workers}
    last_loss = {}
    for _ in range(FLAGS.rounds):
      for variant, worker in workers.items():  # Interleaved: load swings hit all alike.
        answer = _ask(worker, variant, f"run {FLAGS.steps}")
        times[variant].append(answer["seconds"])
        last_loss[variant] = answer["loss"]
  finally:
    for worker in workers.values():
      if worker.poll() is None:
        worker.stdin.write("quit\n")
        worker.stdin.flush()
        worker.wait()
  best = {v: 1000 * min(t) / FLAGS.steps for v, t in times.items()}
  base = "baseline"
  rel = lambda a, b: abs(a - b) / abs(b)
  rows = [{"variant": v, "best_step_ms": best[v], "time_vs_baseline": best[v] / best[base],
           "first_loss_rel_diff": rel(first_loss[v], first_loss[base]),
           "last_loss_rel_diff": rel(last_loss[v], last_loss[base])} for v in workers]
  print(f"KD step {FLAGS.teacher} -> {FLAGS.student}, batch {FLAGS.batch_size}, "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps, interleaved, best per variant")
  print("| variant | best ms/step | time / baseline | first-step loss rel. diff | "
        f"loss rel. diff after {FLAGS.warmup + FLAGS.rounds * FLAGS.steps} steps |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['variant']} | {r['best_step_ms']:.1f} | {r['time_vs_baseline']:.3f} | "
          f"{r['first_loss_rel_diff']:.1e} | {r['last_loss_rel_diff']:.1e} |")
  print(json.dumps({"benchmark": "profile_step_compare", "batch_size": FLAGS.batch_size,
                    "rounds": FLAGS.rounds, "steps": FLAGS.steps, "rows": rows}))


# --- profile ------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"')
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_BATCH_NORM = re.compile(r"/(\w*_)?(bn\d*|batch_?norm\w*)/", re.IGNORECASE)


def _parse_hlo(text: str) -> Dict[str, dict]:
  """{instruction name: {'opcode', 'op_name', 'source', 'computation', 'calls'}}."""
  instructions, computation = {}, None
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      head = _COMPUTATION.match(line)
      if head:
        computation = head.group(1)
      continue
    op_name, source, calls = _OP_NAME.search(line), _SOURCE.search(line), _CALLS.search(line)
    instructions[match.group(1)] = {
        "opcode": match.group(2), "computation": computation,
        "op_name": op_name.group(1) if op_name else "",
        "source": source.group(1) if source else "",
        "calls": calls.group(1) if calls else None}
  return instructions


def _classify(name: str, instructions: Dict[str, dict]) -> tuple:
  """(phase, kind) of one executed instruction (a thunk), from its op names.

  JAX names ops `jit(train_step)/<transform>(<Model>)/<module path>/<primitive>`: the
  student's forward runs under `jvp(...)`, its backward under `transpose(jvp(...))`, the
  teacher's forward under the model's name alone; ops outside any module are the loss and
  the optimizer update. Flax module paths name the BatchNorms (`bn1`, `stem_bn`, ...).
  """
  inst = instructions[name]
  members = [inst]
  if inst["calls"]:
    members += [i for i in instructions.values() if i["computation"] == inst["calls"]]
  op_names = [m["op_name"] for m in members if m["op_name"]]
  joined = " ".join(op_names)
  opcodes = {m["opcode"] for m in members}
  in_module = any(len(n.split("/")) > 2 for n in op_names)
  if not op_names and "convolution" in opcodes:
    phase = "student bwd"  # Weight-gradient convolutions that XLA built carry no op name.
  elif "transpose(" in joined:
    phase = "student bwd"
  elif "jvp(" in joined:
    phase = "student fwd"
  elif in_module:
    phase = "teacher fwd"
  else:
    phase = "loss+update"
  if "convolution" in opcodes:
    kind = "conv"
  elif "dot" in opcodes:
    kind = "dot"
  elif _BATCH_NORM.search(joined):
    kind = "batchnorm"
  else:
    kind = "elementwise/other"
  return phase, kind


def profile_jax(fold: bool, trace_dir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  step, state, teacher_variables, batch = build_step(
      FLAGS.student, FLAGS.teacher, FLAGS.num_classes, FLAGS.batch_size, fold)
  compiled = step.lower(state, teacher_variables, batch).compile()
  instructions = _parse_hlo(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  for _ in range(FLAGS.warmup):
    state, _ = compiled(state, teacher_variables, batch)
  jax.block_until_ready(state)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = compiled(state, teacher_variables, batch)
    jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - start
  trace_files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                                 recursive=True), key=os.path.getmtime)
  with gzip.open(trace_files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") == "X" and name in instructions:
      totals[_classify(name, instructions)] += event["dur"] / 1000.0  # us -> ms
  return {"ms_per_step": {f"{p} / {k}": v / FLAGS.steps for (p, k), v in totals.items()},
          "wall_ms_per_step": 1000 * wall / FLAGS.steps,
          "flops_per_step": float(cost.get("flops", 0.0)) if cost else 0.0,
          "trace": trace_files[-1]}


def profile_torch() -> dict:
  """Self CPU time of the torch reference step's operators, by phase and kind."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile, record_function  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference as ref  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  student = ref.build_model(FLAGS.student, FLAGS.num_classes)
  teacher = ref.build_model(FLAGS.teacher, FLAGS.num_classes)
  optimizer = ref.make_optimizer(student)
  images = torch.randn(FLAGS.batch_size, 3, 32, 32)
  labels = torch.randint(0, FLAGS.num_classes, (FLAGS.batch_size,))

  def step():  # benchmarks.torch_reference.kd_train_step, with the phases marked.
    student.train()
    teacher.eval()
    with record_function("teacher fwd"), torch.no_grad():
      teacher_logits = teacher(images)
    with record_function("student fwd"):
      student_logits = student(images)
    with record_function("loss+update"):
      loss = ref.kd_loss(student_logits, teacher_logits, labels)
    optimizer.zero_grad()
    with record_function("student bwd"):
      loss.backward()
    with record_function("loss+update"):
      optimizer.step()

  for _ in range(FLAGS.warmup):
    step()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      step()
    wall = time.perf_counter() - start
  phases = ("teacher fwd", "student fwd", "student bwd", "loss+update")
  totals = collections.Counter()
  for event in prof.events():
    if event.name in phases or not event.name.startswith("aten::"):
      continue
    phase, parent = "student bwd", event.cpu_parent  # Autograd-engine threads: backward.
    while parent is not None:
      if parent.name in phases:
        phase = parent.name
        break
      parent = parent.cpu_parent
    name = event.name
    kind = ("conv" if "conv" in name else "batchnorm" if "batch_norm" in name
            else "dot" if name in ("aten::addmm", "aten::mm", "aten::matmul") else
            "elementwise/other")
    totals[phase, kind] += event.self_cpu_time_total / 1000.0
  return {"ms_per_step": {f"{p} / {k}": v / FLAGS.steps for (p, k), v in totals.items()},
          "wall_ms_per_step": 1000 * wall / FLAGS.steps,
          "threads": torch.get_num_threads()}


def profile_main():
  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="kdjax_profile_")
  result = {"jax": profile_jax(FLAGS.fold_teacher, os.path.expanduser(trace_dir))}
  if FLAGS.reference == "torch":
    result["torch"] = profile_torch()
  keys = sorted(set().union(*(r["ms_per_step"] for r in result.values())))
  print(f"KD step {FLAGS.teacher} -> {FLAGS.student}, batch {FLAGS.batch_size}: ms per step "
        f"({FLAGS.steps} traced steps; XLA thunks / torch operators' self CPU time)")
  print("| phase / kind | " + " | ".join(f"{n} ms" for n in result) + " |")
  print("| --- |" + " ---: |" * len(result))
  for key in keys + ["sum of the above", "wall clock"]:
    cells = [(sum(r["ms_per_step"].values()) if key == "sum of the above" else
              r["wall_ms_per_step"] if key == "wall clock" else r["ms_per_step"].get(key, 0.0))
             for r in result.values()]
    print(f"| {key} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
  print(f"XLA flops per step: {result['jax']['flops_per_step'] / 1e9:.2f} G; "
        f"trace: {result['jax']['trace']}")
  print(json.dumps({"benchmark": "profile_step", "batch_size": FLAGS.batch_size, **result}))


def _check_flags():
  """Every mistake in one line before anything is built (cheap checks before importing
  the models)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from kdjax.names import did_you_mean  # pylint: disable=g-import-not-at-top
  for flag in ("num_classes", "batch_size", "steps", "rounds"):
    if FLAGS[flag].value <= 0:
      cli.fail(f"--{flag} must be a positive integer, got {FLAGS[flag].value}.")
  if FLAGS.warmup < 1:
    cli.fail(f"--warmup must be >= 1 (the first step compiles), got {FLAGS.warmup}.")
  for variant in FLAGS.variants:
    if variant not in VARIANTS:
      cli.fail(f"--variants: {variant!r} is not a variant{did_you_mean(variant, VARIANTS)}; "
               f"valid values: {', '.join(VARIANTS)}.")
  if not FLAGS.variants or FLAGS.variants[0] != "baseline":
    cli.fail(f"--variants must start with baseline (ratios are to it), got "
             f"{','.join(FLAGS.variants)}.")
  from kdjax import models  # pylint: disable=g-import-not-at-top
  for flag, name in (("--student", FLAGS.student), ("--teacher", FLAGS.teacher)):
    if name not in models.MODELS:
      cli.fail(f"{flag}={name!r} is not a model{did_you_mean(name, models.MODELS)}; valid "
               f"values: {', '.join(sorted(models.MODELS))}.")
    if models.registry.model_input_kind(name) != "image32":
      cli.fail(f"{flag}={name!r} is not a 32x32 image model; profile_step times the CIFAR "
               "KD step.")
  if FLAGS.mode == "profile" and FLAGS.reference == "torch" and (
      importlib.util.find_spec("torch") is None):
    cli.fail("--reference=torch needs PyTorch (pip install torch==2.13.0); or give "
             "--reference=none.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.worker:
    _worker(FLAGS.worker)
    return
  _check_flags()
  if FLAGS.mode == "profile":
    profile_main()
  else:
    compare_main()


if __name__ == "__main__":
  cli.run(main, config_name=None)
