r"""The method x model matrix: every method on every teacher/student pair of the CIFAR-100
recipes, checked with `jax.eval_shape` (no compilation), and optionally trained a few steps
on a random batch and timed.

    python -m benchmarks.matrix --mode=shapes          # every method x every pair, seconds
    python -m benchmarks.matrix --mode=steps --steps=3 --methods=kd,crd --pairs=resnet32x4:resnet8x4
    python -m benchmarks.matrix --mode=models          # per model: parameters, KD step speed

`shapes`: traces each method's init and loss on the pair's abstract outputs with the recipe's
hyper-parameters (`configs/cifar100/distill.py`): "ok" or the one-line error a run would give.
`steps`: compiles the real train step (1 device) and runs `--steps` steps: finite loss and
milliseconds per step. `models`: every CIFAR model's parameter count and its KD train-step
throughput as the student of `resnet32x4` (batch `--batch_size`). Prints a markdown table.
One compile of a CIFAR ResNet KD step takes 10-20 s on a 2-core CPU: `steps` over the whole
matrix takes hours there; pick `--methods` and `--pairs`.
"""

import math

from absl import flags, logging

from experiments import cli

flags.DEFINE_enum("mode", "shapes", ["shapes", "steps", "models"], "What to run.")
flags.DEFINE_string("methods", "", "Comma-separated methods (default: every method).")
flags.DEFINE_string("pairs", "", "Comma-separated teacher:student pairs (default: the recipes').")
flags.DEFINE_integer("steps", 3, "Steps per cell in --mode=steps / models (after 1 warm-up).")
flags.DEFINE_integer("batch_size", 64, "Batch size of --mode=steps / models.")
FLAGS = flags.FLAGS

# Methods that need more than one teacher or another kind of model than the CIFAR CNNs.
_SKIPPED = {"multi_teacher_kd": "several teachers", "meal_v2": "several teachers",
            "minilm": "ViT attention taps"}


def _pairs():
  from configs.cifar100 import distill
  if not FLAGS.pairs:
    return list(distill.PUBLISHED)
  pairs = []
  for item in FLAGS.pairs.split(","):
    teacher, sep, student = item.partition(":")
    if not sep or (teacher, student) not in distill.PUBLISHED:
      cli.fail(f"--pairs: {item!r} is not one of the recipes' teacher:student pairs: "
               + ", ".join(f"{t}:{s}" for t, s in distill.PUBLISHED) + ".")
    pairs.append((teacher, student))
  return pairs


def _methods():
  from kdjax.methods import METHODS
  names = [m.strip() for m in FLAGS.methods.split(",") if m.strip()] or sorted(METHODS)
  for name in names:
    if name not in METHODS:
      cli.fail(f"--methods: {name!r} is not a method; methods: {', '.join(sorted(METHODS))}.")
  return names


def _recipe(teacher, student, method):
  from configs.cifar100 import distill
  return distill.get_config(f"teacher={teacher},student={student},method={method}")


def shapes_cell(teacher, student, method) -> str:
  from kdjax.train.preflight import check_method_fits_models
  try:
    check_method_fits_models(_recipe(teacher, student, method))
    return "ok"
  except ValueError as error:
    return "error: " + cli.one_line(str(error))


def steps_cell(teacher, student, method) -> str:
  from benchmarks.synthetic_step import build_synthetic_step
  config = _recipe(teacher, student, method)
  try:
    step = build_synthetic_step(student, teacher, num_classes=100,
                                batch_size=FLAGS.batch_size, method_name=method,
                                method_config=config[method] if method in config else None)
    step.run(1)
    seconds = step.run(FLAGS.steps)
  except ValueError as error:
    return "error: " + cli.one_line(str(error))
  loss = step.last_metrics()["loss"]
  status = "ok" if math.isfinite(loss) else "NON-FINITE"
  return f"{status} {1000 * seconds / FLAGS.steps:.0f} ms"


def _table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.steps <= 0 or FLAGS.batch_size <= 0:
    cli.fail("--steps and --batch_size must be positive integers.")
  if FLAGS.mode == "models":
    from benchmarks.synthetic_step import build_synthetic_step
    from kdjax.models.registry import ENTRIES
    rows = []
    for name, entry in ENTRIES.items():
      if entry.input_kind != "image32":
        continue
      step = build_synthetic_step(name, "resnet32x4", num_classes=100,
                                  batch_size=FLAGS.batch_size, method_name="kd")
      step.run(1)
      seconds = step.run(FLAGS.steps)
      rows.append((name, f"{step.student_params:,}",
                   f"{FLAGS.batch_size * FLAGS.steps / seconds:.1f}"))
      print(rows[-1], flush=True)
    print(_table(["student", "parameters (100 classes)",
                  f"KD step ex/s as student of resnet32x4 (batch {FLAGS.batch_size})"], rows))
    return
  cell = shapes_cell if FLAGS.mode == "shapes" else steps_cell
  pairs, names = _pairs(), _methods()
  rows = []
  for method in names:
    row = [method]
    for teacher, student in pairs:
      row.append(f"skipped ({_SKIPPED[method]})" if method in _SKIPPED else
                 cell(teacher, student, method))
    rows.append(row)
    print(" | ".join(row), flush=True)
  print(_table(["method"] + [f"{t} -> {s}" for t, s in pairs], rows))


if __name__ == "__main__":
  cli.run(main, config_name=None)
