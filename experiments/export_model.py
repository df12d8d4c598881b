r"""Writes a trained run's model as one file (flax msgpack), e.g. the LM quickstart's teacher.

    python -m experiments.export_model --run_dir=runs/lm_teacher/teacher \
        --out=kdjax/assets/lm_teacher_pydoc.msgpack --dtype=bfloat16

The file holds the model's variables (bfloat16 halves it; loading casts back to float32), its
name and how it was trained (the run's config and summary). Use it as a teacher with
`--config.teacher.checkpoint=FILE`. Paths may be relative or start with '~'; mistakes end in
one line `Error: ...` and exit status 2.
"""

import json
import os

from absl import flags

from experiments import cli


def _define_flags():
  flags.DEFINE_string("run_dir", None, "A finished run's directory (config.json, checkpoints/).")
  flags.DEFINE_string("out", None, "The file to write (.msgpack).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of floats.")
  flags.mark_flags_as_required(["run_dir", "out"])


def export_run(run_dir: str, out: str, *, dtype: str = "float32") -> int:
  """Exports `run_dir`'s trained model to `out`; returns the file size in bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from kdjax import models as models_lib, paths  # pylint: disable=g-import-not-at-top
  from kdjax.train import checkpoint, load, run_setup  # pylint: disable=g-import-not-at-top
  run_dir, out = paths.resolve(run_dir), paths.resolve(out)
  config_path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(config_path):
    raise cli.UsageError(f"--run_dir={run_dir}: no config.json; give a kdjax run's directory "
                         "(e.g. <workdir>/teacher).")
  if not out.endswith(checkpoint.EXPORTED_SUFFIX):
    raise cli.UsageError(f"--out={out}: the file name must end in {checkpoint.EXPORTED_SUFFIX}.")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = config.student.model  # A run trains its `student`; a suite's teacher run too.
  try:
    model_kwargs = load.student_model_kwargs(config, what=f"--run_dir={run_dir}")
  except FileNotFoundError as error:
    raise cli.UsageError(str(error)) from None
  module = models_lib.get_model(model, num_classes=config.num_classes, **model_kwargs)
  sample = run_setup.sample_inputs(config)
  expected = jax.eval_shape(lambda: models_lib.init_variables(module, jax.random.PRNGKey(0),
                                                              sample))
  try:
    variables = checkpoint.load_model_variables(os.path.join(run_dir, "checkpoints"), expected,
                                                model_name=model)
  except checkpoint.CheckpointError as error:
    raise cli.UsageError(f"--run_dir={run_dir}: {error}") from None
  summary_path = os.path.join(run_dir, "run_summary.json")
  summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
  meta = {"config": json.loads(config.to_json()), "summary": summary, "dtype": dtype}
  return checkpoint.export_model_variables(variables, out, model_name=model, dtype=dtype,
                                           meta=meta)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag=value.")
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    size = export_run(flags.FLAGS.run_dir, flags.FLAGS.out, dtype=flags.FLAGS.dtype)
  except cli.UsageError as error:
    cli.fail(str(error))
  print(f"Wrote {flags.FLAGS.out} ({size / 1e6:.1f} MB). Distil from it with "
        f"--config.teacher.checkpoint={flags.FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, config_name=None)
