"""README.md's commands, pasted verbatim into a shell at the root of a fresh copy of the
repository, with an empty HOME: what a new user does first."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")

# Appended to a README command whose full run is long (later flags override earlier ones).
SHORTER = {
    "benchmarks.benchmark": ["--steps=1", "--warmup=1", "--rounds=1", "--batch_size=4"],
    "benchmarks.loss_benchmark": ["--batch", "1", "--seq", "8", "--vocab", "64", "--repeats",
                                   "1"],
}


def shortened(command: str) -> str:
  """The quickstart's smoke variant for experiments.main (absl refuses a second --config),
  fewer steps for the benchmarks; commands that are short already stay as written."""
  if "--help" in command or ":smoke" in command:
    return command
  module = command.split()[2]
  if module == "experiments.main" and "configs/lm_quickstart.py" in command:
    # Its smoke variant with two rows (every row runs in tests/test_lm_runs.py).
    return re.sub(r"--config=configs/lm_quickstart\.py(?=\s)",
                  "--config=configs/lm_quickstart.py:smoke", command) + " --config.suite=teacher,kd"
  if module == "experiments.main" and "configs/diffusion_quickstart.py" in command:
    # Its smoke variant with one row (every row: tests/diffusion/test_runs.py).
    return re.sub(r"--config=configs/diffusion_quickstart\.py(?=\s)",
                  "--config=configs/diffusion_quickstart.py:smoke", command) + (
                      " --config.suite=consistency")
  if module == "experiments.main":
    return re.sub(r"--config=configs/quickstart\.py(?=\s)", "--config=configs/quickstart.py:smoke",
                  command)
  return " ".join([command] + SHORTER.get(module, []))


def readme_commands(text: str):
  """The commands of README's ```bash blocks, continuation lines joined, comments dropped."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for command in block.replace("\\\n", " ").splitlines():
      command = re.sub(r"\s+#.*$", "", command).strip()
      if command:
        commands.append(command)
  return commands


def _first_command():
  return readme_commands(open(README).read())[0]


MAX_README_LINES = 250


def stated_spread(text: str) -> dict:
  """{run: (mean, std)} of README's quickstart table: the rows `| run | ... | seed 0 | mean ±
  std |` (a row trained once states its value alone: std 0)."""
  spread = {}
  for run, mean, std in re.findall(
      r"^\| (\w+) \| [^|]* \| [0-9.]+ \| ([0-9.]+)(?: ± ([0-9.]+))?[^|]* \|$", text, flags=re.M):
    spread[run] = (float(mean), float(std or 0.0))
  return spread


def outside_spread(accuracy: dict, spread: dict) -> dict:
  """The rows whose accuracy is further from README's mean than 3 std and 2 points."""
  return {run: (accuracy.get(run), mean, std) for run, (mean, std) in spread.items()
          if run not in accuracy or abs(accuracy[run] - mean) > max(3 * std, 0.02)}


def test_readme_is_short_and_states_the_quickstart_spread():
  text = open(README).read()
  assert len(text.splitlines()) <= MAX_README_LINES, len(text.splitlines())
  spread = stated_spread(text)
  assert set(spread) == {"teacher", "scratch", "kd", "dkd", "dist", "kd_std", "nkd", "fitnet",
                         "rkd", "crd"}, spread
  assert spread["kd"][0] > spread["scratch"][0]
  assert spread["teacher"][1] == 0.0 and spread["kd"][1] > 0
  assert outside_spread({run: mean for run, (mean, _) in spread.items()}, spread) == {}
  assert set(outside_spread({**{r: m for r, (m, _) in spread.items()}, "kd": 0.7},
                            spread)) == {"kd"}


def test_readme_first_command_installs_then_runs_the_quickstart():
  install, run = [part.strip() for part in _first_command().split("&&")]
  assert install == 'pip install -e ".[test]"'
  assert run.startswith("python -m experiments.main --config=configs/quickstart.py ")
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read()
  assert f"pip install --quiet -e \"{install.split('-e ')[1].strip(chr(34))}\"" in ci
  assert "\nrun_pytest " in ci  # README's test command, `pytest`, with nothing added.


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
  """The repository's files as a fresh clone has them (tracked and not ignored), and an
  empty HOME, so that nothing of the developer's machine (data, runs) is found."""
  root = tmp_path_factory.mktemp("fresh")
  repo, home = root / "kdjax", root / "home"
  home.mkdir()
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                           "-z"], cwd=REPO, capture_output=True, check=True).stdout
  for name in filter(None, listed.decode().split("\0")):
    if os.path.isfile(os.path.join(REPO, name)):
      os.makedirs(repo / os.path.dirname(name), exist_ok=True)
      shutil.copy2(os.path.join(REPO, name), repo / name)
  return repo, home


def _shell(command, repo, home, timeout=900):
  """`command` in bash at the copy's root, as typed: no PYTHONPATH, HOME empty, this
  interpreter's `python` first on PATH."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "XLA_FLAGS", "KDJAX_DATA_DIR", "TFDS_DATA_DIR")}
  env["HOME"] = str(home)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
def test_readme_quickstart_verbatim_in_a_fresh_copy(fresh_copy):
  """The run part of README's first command, exactly as written (relative --workdir)."""
  repo, home = fresh_copy
  run = _first_command().split("&&")[1].strip()
  start = time.perf_counter()
  result = _shell(run, repo, home)
  wall = time.perf_counter() - start
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert f"Generating mnist1d into {home}/tensorflow_datasets/mnist1d" in result.stdout
  assert "Downloading" not in result.stdout + result.stderr
  with open(repo / "runs" / "quickstart" / "summary.json") as f:
    runs = json.load(f)["runs"]
  accuracy = {name: run["eval_accuracy"] for name, run in runs.items()}
  assert accuracy["teacher"] >= 0.9 and accuracy["teacher"] > accuracy["scratch"], accuracy
  assert accuracy["kd"] > accuracy["scratch"], accuracy
  # Every row within 3 std (over seeds 0-2) or 2 points of the mean README states.
  assert outside_spread(accuracy, stated_spread(open(README).read())) == {}, accuracy
  assert f"Results in {repo}/runs/quickstart/ (summary.json, results.md, results.csv, " \
         "results.png)" in result.stdout
  for name in ("summary.json", "results.md", "results.csv", "results.png"):
    assert os.stat(repo / "runs" / "quickstart" / name).st_mode & 0o044 == 0o044  # Readable.
  assert wall < 600, f"quickstart took {wall:.0f} s"
  print(f"README quickstart: {wall:.0f} s; {accuracy}")

  rerun = _shell(run, repo, home)
  assert rerun.returncode == 0
  assert "[kd] finished earlier" in rerun.stdout and "step " not in rerun.stdout


@pytest.mark.slow
def test_every_other_readme_experiment_command_in_a_fresh_copy(fresh_copy):
  """Every other `python -m experiments...` line of README's code blocks, in order (the
  second "any config" command uses the first one's teacher), shortened where long; `--help`
  and `--list` print the reference."""
  repo, home = fresh_copy
  commands = [c for c in readme_commands(open(README).read())[1:]
              if c.startswith("python -m experiments.")]
  assert len(commands) >= 5, commands
  for command in map(shortened, commands):
    result = _shell(command, repo, home)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, (command, result.stderr[-3000:])
    if "--list=configs" in command:
      assert "configs/cifar100/distill.py" in result.stdout, result.stdout[-2000:]
    if "--help" in command:
      assert re.search(r"--config\.kd\.temperature=4\.0 +softmax temperature", result.stdout)
  for workdir in ("runs/qs", "runs/one", "runs/smoke"):
    assert (repo / workdir / "summary.json").exists(), workdir
