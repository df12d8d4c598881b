"""Runs an experiment config: `python -m experiments.main --config=configs/X.py --workdir=DIR`.

Any config field can be overridden: `--config.method=dkd --config.parallel=pmap`; list them
with `--config=configs/X.py --help` (each with its meaning and valid values), and the
methods, models, datasets and configs with `--list=methods|models|datasets|configs`.
`--register=my_module` imports a module of yours first, which registers the models and
datasets the config names (docs/bring_your_own.md). Results: DIR/summary.json, DIR/results.md,
DIR/results.csv, DIR/results.png, and one subdirectory per run. Paths may be relative or start with '~'.
Mistakes end in one line `Error: ...` and exit status 2, before any work.
"""

import importlib
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed). "
    "Leave unset on one host, or on clusters where jax.distributed autodetects.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() and let it detect the "
    "cluster (Cloud TPU, SLURM, ...), without the three flags above.")
_REGISTER = flags.DEFINE_multi_string(
    "register", [], "A Python module to import before the run (repeatable), e.g. "
    "--register=my_models: it registers the models and datasets the config names "
    "(kdjax.models.register, kdjax.data.register_arrays).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/kdjax/jax",
    "Directory of JAX's persistent compilation cache ('' turns it off): runs that compile the "
    "same program (a suite's rows evaluating the same student, seeds, reruns) load it instead "
    "of compiling again. Ignored when JAX_COMPILATION_CACHE_DIR is set.")
flags.DEFINE_enum("list", None, ["methods", "models", "datasets", "configs"],
                  "Print the reference of the methods (family, paper, hyper-parameters and "
                  "their meanings), models (input, parameters, taps), datasets or configs "
                  "(with their variants) and exit; needs no --config or --workdir.")
flags.mark_flags_as_required(["config", "workdir"])

# Least recently used entries beyond this are evicted (one CIFAR KD step is ~5-20 MB).
COMPILATION_CACHE_MAX_BYTES = 2 * 1024 ** 3


def _initialize_distributed(jax):
  if _COORDINATOR.value is None and _NUM_PROCESSES.value is None:
    if _DISTRIBUTED.value:
      jax.distributed.initialize()
    return
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    # CPU collectives across processes need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def _enable_compilation_cache(jax, paths):
  """JAX's persistent compilation cache: an executable is keyed by its program, compile
  options, device and versions, so a cached one is the very program a compile would give."""
  if not _COMPILATION_CACHE.value or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  directory = paths.resolve(_COMPILATION_CACHE.value)
  from kdjax.train import files  # pylint: disable=g-import-not-at-top
  try:  # HOME set to a regular file: one line, not a traceback at the first compile.
    files.check_directory_path(directory, "--compilation_cache")
  except files.WorkdirError as error:
    cli.fail(str(error))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO.
    logging.set_verbosity(logging.WARNING)
  import jax  # After flag parsing, so that XLA_FLAGS / platform flags set by users apply.
  from kdjax import paths

  _enable_compilation_cache(jax, paths)
  _initialize_distributed(jax)
  from experiments import report
  from kdjax import data, train
  for module in _REGISTER.value:  # Before the config's names are checked.
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as error:
      if error.name != module.split(".")[0] and error.name != module:
        raise  # A missing import inside the user's module: its traceback helps.
      cli.fail(f"--register={module}: no module {module!r} importable from {os.getcwd()!r}.")
  workdir = paths.resolve(_WORKDIR.value)
  # The user's mistakes (config, paths, a busy workdir): one line, status 2, nothing done.
  # A run that went wrong (non-finite loss, full disk): one line naming what, status 1.
  user_errors = (train.ConfigError, train.ConfigChanged, train.CheckpointError,
                 train.WorkdirError, data.DatasetNotPreparedError, data.InvalidLabelsError)
  try:
    summary = train.run_suite(_CONFIG.value, workdir, num_devices=jax.device_count(),
                              write_report=False)  # Written here, to print its table.
    if jax.process_index() == 0:
      table = report.write_report(summary, workdir)
  except user_errors as error:
    cli.fail(str(error))
  except (train.NonFiniteLoss, train.DiskFullError) as error:
    cli.fail(str(error), exit_code=1)
  except (MemoryError, jax.errors.JaxRuntimeError) as error:
    if not isinstance(error, MemoryError) and "RESOURCE_EXHAUSTED" not in str(error):
      raise  # Not memory: its traceback is the report.
    cli.fail(f"Out of memory during the run ({type(error).__name__}); what was checkpointed "
             "is kept. Lower config.global_batch_size (a new workdir: it changes training) or "
             "config.eval_batch_size, or free memory and rerun the same command.", exit_code=1)
  if jax.process_index() == 0:
    print("\n" + table + f"\nResults in {workdir}/ (summary.json, results.md, results.csv, "
          "results.png)")


if __name__ == "__main__":
  cli.run(main)
