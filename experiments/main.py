"""Runs an experiment config: `python -m experiments.main --config=configs/X.py --workdir=DIR`.

Any config field can be overridden: `--config.method=dkd --config.parallel=pmap`. Results:
DIR/summary.json, DIR/results.md, DIR/results.png, and one subdirectory per run.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO.
    logging.set_verbosity(logging.WARNING)
  import jax  # After flag parsing, so that XLA_FLAGS / platform flags set by users apply.

  from experiments import report
  from kdjax import train
  try:
    summary = train.run_suite(_CONFIG.value, _WORKDIR.value, num_devices=jax.device_count())
  except (train.ConfigError, train.Preempted) as error:
    print(f"\n{error}", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(error, train.ConfigError) else 0)
  if jax.process_index() == 0:
    table = report.write_report(summary, _WORKDIR.value)
    print("\n" + table + f"\nResults in {_WORKDIR.value}/ (summary.json, results.md, results.png)")


if __name__ == "__main__":
  app.run(main)
