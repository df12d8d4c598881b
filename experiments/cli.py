"""Command-line plumbing of the entry points: one-line errors, `--help`, checked configs.

Every user mistake on the command line ends in one line `Error: <what, where, what is
allowed>` on stderr and exit status 2, before anything is computed or written:

    experiments.cli.run(main)                    # instead of absl's app.run(main)

Before absl parses the flags, the `--config=FILE[:VARIANT]` file is loaded and every
`--config.a.b=value` override is checked against it (unknown fields get "did you mean" and the
fields that exist), so that ml_collections' chained tracebacks never reach the user.
`--help` exits 0 and lists the config's fields with their defaults, meanings and valid values;
`--list=methods|models|datasets|configs` prints the generated reference (`kdjax.reference`).
"""

import importlib.util
import os
import sys
from typing import Callable, List, NoReturn, Optional, Sequence

from absl import app, flags

from kdjax import signals
from kdjax.names import did_you_mean

USAGE_ERROR_EXIT_CODE = 2  # As argparse and most Unix tools: "wrong usage".
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL, "try again": stopped by a signal, continues on rerun.
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C: nothing was started.
_HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs")


class UsageError(ValueError):
  """A mistake in the command line; its message is printed as one line."""


def one_line(message: str) -> str:
  return " ".join(str(message).split())


def fail(message: str, *, exit_code: int = USAGE_ERROR_EXIT_CODE) -> NoReturn:
  print(f"Error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


# --- config files -------------------------------------------------------------------------


def _available_configs() -> List[str]:
  if not os.path.isdir(_CONFIGS_DIR):
    return []
  return sorted(f"configs/{n}" for n in os.listdir(_CONFIGS_DIR)
                if n.endswith(".py") and not n.startswith("_") and n != "common.py")


def load_config(spec: str):
  """Loads `FILE[:VARIANT]` as ml_collections' config flag does; raises UsageError."""
  path, _, variant = spec.partition(":")
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    available = _available_configs()
    hint = did_you_mean(path, available) if available else ""
    raise UsageError(f"--config={spec}: no such config file {path!r}{hint}. "
                     f"Configs: {', '.join(available) or '(none found)'}.")
  module_spec = importlib.util.spec_from_file_location("kdjax_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as error:  # A broken config file: its own error, on one line.
    raise UsageError(f"--config={spec}: loading {path!r} failed: "
                     f"{type(error).__name__}: {error}") from None
  if not hasattr(module, "get_config"):
    raise UsageError(f"--config={spec}: {path!r} defines no get_config().")
  try:
    config = module.get_config(*([variant] if variant else []))
  except Exception as error:  # A bad variant after ':' and the like.
    raise UsageError(f"--config={spec}: {error}") from None
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"--config={spec}: get_config() in {path!r} returned a "
                     f"{type(config).__name__}, not an ml_collections.ConfigDict (build it with "
                     f"ml_collections.ConfigDict(...) or start from configs/common.py).")
  return config


def flat_fields(config, prefix: str = "") -> dict:
  """{'kd.temperature': 4.0, ...} for every leaf field of a ConfigDict."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, "keys") and hasattr(value, "to_dict"):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _override_fields(argv: Sequence[str], name: str):
  """(field path, raw value or None) of each `--name.a.b[=v]` argument."""
  for i, argument in enumerate(argv):
    for flag_prefix in (f"--{name}.", f"--no{name}."):
      if argument.startswith(flag_prefix):
        field, has_value, value = argument[len(flag_prefix):].partition("=")
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
          value, has_value = argv[i + 1], True
        yield field, (value if has_value else None)


def _check_value(path: str, default, value: Optional[str]):
  """Bad values of int / float / bool fields, in the words of the field."""
  if value is None or default is None or isinstance(default, str):
    return
  kind = type(default)
  expected = {bool: "True or False", int: "an integer", float: "a number"}.get(kind)
  if expected is None:
    return
  try:
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError
    elif kind is int:
      int(value)
    elif kind is float:
      float(value)
  except ValueError:
    raise UsageError(f"--config.{path}={value}: config.{path} takes {expected} "
                     f"(default {default!r}).") from None


def check_overrides(config, argv: Sequence[str], name: str = "config"):
  """Raises UsageError for an override naming a field the config does not have."""
  for path, value in _override_fields(argv, name):
    node, walked = config, name
    for part in path.split("."):
      if not (hasattr(node, "keys") and hasattr(node, "to_dict")):
        raise UsageError(f"--{name}.{path}: {walked} is a value ({node!r}), not a group of "
                         "fields.")
      if part not in node:
        fields = sorted(node.keys())
        raise UsageError(
            f"--{name}.{path}: {walked} has no field {part!r}{did_you_mean(part, fields)}. "
            f"Fields of {walked}: {', '.join(fields)}.")
      node, walked = node[part], f"{walked}.{part}"
    if hasattr(node, "keys") and hasattr(node, "to_dict"):
      raise UsageError(f"--{name}.{path}: {walked} is a group of fields "
                       f"({', '.join(sorted(node.keys()))}); override one of them.")
    _check_value(path, node, value)


def _config_spec(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of the last `--name=FILE` (absl keeps the last of repeated flags)."""
  spec = None
  for i, argument in enumerate(argv):
    if argument.startswith(f"--{name}="):
      spec = argument.split("=", 1)[1]
    elif argument == f"--{name}" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


# --- parsing and help ---------------------------------------------------------------------


def _print_help(argv: Sequence[str], config_name: Optional[str]):
  main_module = sys.modules.get("__main__")
  print((getattr(main_module, "__doc__", None) or "").strip() + "\n")
  print(flags.FLAGS.main_module_help())
  if not config_name:
    return
  spec = _config_spec(argv, config_name)
  if spec is None:
    print(f"\nAdd --{config_name}=FILE to --help to list that config's fields. Configs: "
          f"{', '.join(_available_configs())}.")
    return
  try:
    config = load_config(spec)
  except UsageError as error:
    fail(str(error))
  from kdjax import reference  # pylint: disable=g-import-not-at-top  (imports jax)
  print(f"\nFields of {spec} (override with --{config_name}.<field>=<value>; a method's "
        "fields are described by --list=methods):")
  described = reference.describe_config(flat_fields(config))
  width = min(48, max(len(f"--{config_name}.{f.path}={f.default!r}") for f in described))
  for field in described:
    flag = f"--{config_name}.{field.path}={field.default!r}"
    meaning = field.meaning + (f" [{field.valid}]" if field.valid else "")
    print(f"  {flag:<{width}}  {meaning}".rstrip() if len(flag) <= width else
          f"  {flag}\n  {'':<{width}}  {meaning}".rstrip())


def _print_listing(argv: Sequence[str]) -> bool:
  """`--list=KIND` (methods, models, datasets, configs): prints the generated reference
  (`kdjax.reference`) and returns True; False without --list."""
  kinds = [a.split("=", 1)[1] for a in argv if a.startswith("--list=")]
  if not kinds:
    return False
  from kdjax import reference  # pylint: disable=g-import-not-at-top  (imports jax)
  for kind in kinds:
    if kind not in reference.LIST_KINDS:
      fail(f"--list={kind}: valid: {', '.join(reference.LIST_KINDS)}.")
    print(reference.listing(kind, _CONFIGS_DIR))
  return True


def parse_flags(argv: List[str], *, config_name: Optional[str] = "config") -> List[str]:
  """absl `flags_parser`: --help and --list exit 0, every mistake exits 2 with one line."""
  if config_name and _print_listing(argv[1:]):
    sys.exit(0)
  if any(argument in _HELP_FLAGS for argument in argv[1:]):
    _print_help(argv[1:], config_name)
    sys.exit(0)
  if config_name:
    spec = _config_spec(argv[1:], config_name)
    if spec is not None:
      try:
        check_overrides(load_config(spec), argv[1:], config_name)
      except UsageError as error:
        fail(str(error))
      # ml_collections does not expand '~' in the config path; the shell does not either.
      argv = [f"--{config_name}={os.path.expanduser(spec)}" if a == f"--{config_name}={spec}"
              else a for a in argv]
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(str(error).replace("flag --", "--"))
  except Exception as error:  # pylint: disable=broad-except  (ml_collections' own errors)
    fail(f"{type(error).__name__}: {error}")


def run(main: Callable, *, config_name: Optional[str] = "config"):
  """`absl.app.run(main)` with the parsing above, and one stop-signal handler for all of it.

  A SIGTERM or Ctrl-C at any moment (startup, dataset generation, training, between runs,
  report writing) ends in one line on stderr and exit status 75, "try again": what was written
  is kept and the same command continues; a Ctrl-C before any work started exits 130.
  """
  with signals.handling_stop_signals():
    try:
      app.run(main, flags_parser=lambda argv: parse_flags(argv, config_name=config_name))
    except signals.Preempted as error:
      # Not 0: schedulers (SLURM requeue, Kubernetes Jobs) must see the job as unfinished.
      print(one_line(error), file=sys.stderr, flush=True)
      aborted = error.signal_name == "SIGINT" and not error.work_started
      sys.exit(INTERRUPTED_EXIT_CODE if aborted else PREEMPTED_EXIT_CODE)
