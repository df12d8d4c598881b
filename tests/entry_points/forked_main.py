"""Runs `python -m experiments.main ARGS` once per argument list, each in a child forked from a
process that has already imported what the launcher imports (jax, kdjax, the configs): each
child has the exit status, stdout and stderr of a fresh `python -m experiments.main ARGS`,
without paying the 3-7 s of imports again (test_cli.py checks 20+ mistakes this way).

    python tests/entry_points/forked_main.py CASES.json RESULTS.json

CASES.json: {name: [arg, ...]}; RESULTS.json: {name: {"returncode", "stdout", "stderr"}}.
Whatever the imports print goes to this process's own stderr, where the caller checks that
they printed nothing (a fresh process would have printed it into every error message).
"""

import json
import os
import runpy
import sys
import tempfile
import traceback

# What `experiments.main` imports up to the point where a user's mistake is reported. None of
# these starts a JAX backend or a thread, so forking after them is safe (checked below).
import absl.app  # noqa: F401
import ml_collections  # noqa: F401
import jax
import configs.common  # noqa: F401
import experiments.cli  # noqa: F401
import experiments.report  # noqa: F401
import kdjax.data  # noqa: F401
import kdjax.train  # noqa: F401


def _child(args, stdout_path, stderr_path):
  """In the forked child: `python -m experiments.main args`, then exit with its status."""
  for fd, path in ((1, stdout_path), (2, stderr_path)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  sys.argv = ["experiments/main.py"] + list(args)  # runpy sets argv[0] to the module's path.
  sys.path[0] = os.getcwd()  # As `python -m` has it (here it is this file's directory).
  try:
    runpy.run_module("experiments.main", run_name="__main__", alter_sys=True)
    code = 0
  except SystemExit as exit_:  # As the interpreter maps sys.exit(x) to an exit status.
    code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    if not isinstance(exit_.code, (int, type(None))):
      print(exit_.code, file=sys.stderr)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # Not the parent's loop: this child is done.


def run_cases(cases: dict) -> dict:
  """{name: args} -> {name: {"returncode", "stdout", "stderr"}}, one forked child each."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  assert not xla_bridge._backends, "a JAX backend started before fork"
  results = {}
  with tempfile.TemporaryDirectory() as directory:
    for name, args in cases.items():
      out, err = os.path.join(directory, "out"), os.path.join(directory, "err")
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(args, out, err)
      _, status = os.waitpid(pid, 0)
      with open(out) as f_out, open(err) as f_err:
        results[name] = {"returncode": os.waitstatus_to_exitcode(status),
                         "stdout": f_out.read(), "stderr": f_err.read()}
  return results


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    cases_ = json.load(f)
  with open(sys.argv[2], "w") as f:
    json.dump(run_cases(cases_), f)
