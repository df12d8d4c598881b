"""The smoke quickstart end to end, in fresh processes: devices, parallel strategies, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMOKE, copy_runs, run_python

# One run per distinct code path of the step (per-example and relational logit losses, a
# method with parameters, relational features, a method with state): the multi-device and
# kill tests compare these with the reference suite, run by run.
DISTINCT_RUNS = "--config.suite=teacher,kd,dist,fitnet,rkd,crd"


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)["runs"]


@pytest.fixture(scope="module")
def reference_run(smoke_suite):
  """The smoke quickstart on 1 device, uninterrupted (conftest: shared by other modules)."""
  return smoke_suite


def test_smoke_quickstart_writes_every_result(reference_run):
  workdir, stdout = reference_run
  runs = _summary(workdir)
  students = ["kd", "dkd", "dist", "kd_std", "nkd", "fitnet", "rkd", "crd"]
  assert list(runs) == ["teacher", "scratch"] + students
  for name, run in runs.items():
    assert 0.0 <= run["eval_accuracy"] <= run["best_eval_accuracy"] <= 1.0
    evals = [json.loads(l) for l in open(os.path.join(workdir, name, "metrics.jsonl"))
             if '"eval"' in l]
    assert run["best_eval_accuracy"] == max(l["accuracy"] for l in evals)
    assert run["final_train_loss"] > 0 and run["train_examples_per_sec"] > 0
    assert run["steps"] == (60 if name == "teacher" else 40)
    assert ("teacher_agreement" in run) == (name in students)
  for path in ("results.md", "results.png", "teacher/checkpoints", "kd/metrics.jsonl",
               "kd/run_summary.json", "kd/config.json"):
    assert os.path.exists(os.path.join(workdir, path)), path
  assert os.listdir(os.path.join(workdir, "kd", "tensorboard"))
  assert "| kd | kd | mlp |" in stdout
  with open(os.path.join(workdir, "results.md")) as f:
    assert "| dkd | dkd | mlp |" in f.read()


@pytest.mark.slow  # Two 8-device smoke suites (~2.5 min here); slow tests run in CI too.
@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_eight_devices_give_the_single_device_numbers(reference_run, tmp_path, data_dir,
                                                      parallel):
  reference = _summary(reference_run[0])
  run_python(SMOKE + [f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
                      f"--config.parallel={parallel}", DISTINCT_RUNS],
             env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  runs = _summary(str(tmp_path))
  assert list(runs) == DISTINCT_RUNS.split("=")[1].split(",")
  for name, run in runs.items():
    expected = reference[name]
    assert abs(run["final_train_loss"] - expected["final_train_loss"]) <= \
        1e-3 * abs(expected["final_train_loss"]), (name, run, expected)
    assert abs(run["eval_accuracy"] - expected["eval_accuracy"]) <= 0.01, (name, run, expected)


def test_rerun_of_a_finished_suite_trains_nothing(reference_run, data_dir, tmp_path):
  workdir = str(tmp_path / "copy")  # The shared reference is never changed.
  shutil.copytree(reference_run[0], workdir)
  before = _summary(workdir)
  result = run_python(SMOKE + [f"--workdir={workdir}", f"--config.data_dir={data_dir}"])
  assert "step " not in result.stdout  # No progress lines: nothing was trained.
  assert _summary(workdir) == before


def test_sigkill_after_first_checkpoint_then_rerun_gives_identical_summary(
    reference_run, tmp_path, data_dir):
  # The finished teacher, copied: the run killed here is the student's (a killed teacher:
  # test_resume.py). Its summary is then the reference's by construction; kd and crd are not.
  copy_runs(reference_run[0], tmp_path, ["teacher"])
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  suite = "--config.suite=teacher,kd,crd"  # crd: method state (memory banks) resumes too.
  args = [sys.executable] + SMOKE + [f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
                                     suite]
  process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoints = tmp_path / "kd" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (tmp_path / "kd" / "run_summary.json").exists()
  result = run_python(SMOKE + [f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
                               suite])
  assert "[kd] resumed from step" in result.stdout
  resumed, reference = _summary(str(tmp_path)), _summary(reference_run[0])
  assert list(resumed) == ["teacher", "kd", "crd"]
  for name, run in resumed.items():  # Identical but for the measured speed...
    assert _comparable(run) == _comparable(reference[name]), name


def _comparable(run: dict) -> dict:
  """A run summary without its measured speed, and with its teachers' provenance (step and
  checksum) kept but not their paths (a copied workdir's differ)."""
  provenance = dict(run.get("provenance", {}))
  if "teachers" in provenance:
    provenance["teachers"] = [{k: v for k, v in t.items() if k != "checkpoint"}
                              for t in provenance["teachers"]]
  return {**run, "train_examples_per_sec": None, "provenance": provenance}


@pytest.mark.slow  # Eleven methods through the launcher (~1.5 min here).
def test_every_other_method_runs_from_the_quickstart_suite(tmp_path, data_dir):
  """CTKD, TAID, multi-teacher KD, the sequence divergences, SP and PKT through the real
  launcher."""
  students = ["ctkd", "taid", "multi_teacher_kd", "meal_v2", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl",
              "tvd", "sp", "pkt"]
  run_python(SMOKE + [f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
                      "--config.teacher.extra=cnn1d_small",
                      "--config.suite=" + ",".join(["teacher", "teacher_1"] + students)])
  runs = _summary(str(tmp_path))
  assert runs["teacher_1"]["student"] == "cnn1d_small"
  for name in students:
    assert 0.0 < runs[name]["eval_accuracy"] <= 1.0 and runs[name]["teacher_agreement"] > 0
  metrics = [json.loads(line) for line in open(tmp_path / "ctkd" / "metrics.jsonl")]
  temperatures = [m["temperature"] for m in metrics if m["split"] == "train"]
  assert len(set(temperatures)) > 1  # The learnable temperature was trained.
