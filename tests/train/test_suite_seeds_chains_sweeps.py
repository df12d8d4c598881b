"""Suites over seeds, chained runs (born-again generations) and sweeps: the expanded plan, the
errors, the seed aggregation and its table, and one small end-to-end suite."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from conftest import run_python, set_fields
from experiments import report
from kdjax import methods
from kdjax.methods.base import Batch
from kdjax.models.output import Output
from kdjax.train import ConfigError, plan_suite
from kdjax.train import suite as suite_lib
from kdjax.train.run_dir import config_fingerprint


def _config(suite, **fields):
  config = quickstart.get_config("smoke")
  config.suite = suite
  return set_fields(config, fields, separator="__")


def _plan(tmp_path, suite, **fields):
  workdir = str(tmp_path / "w")
  plan = plan_suite(_config(suite, **fields), workdir, num_devices=1)
  assert not os.path.exists(workdir)  # Planning reads, never writes.
  return plan, workdir


def _ckpt(workdir, directory):
  return os.path.join(workdir, directory, "checkpoints")


def test_seeds_run_every_student_row_per_seed_and_the_teacher_once(tmp_path):
  plan, workdir = _plan(tmp_path, "teacher,scratch,kd", seeds=(3, 5))
  assert [r.directory for r in plan.runs] == [
      "teacher", "scratch/seed3", "scratch/seed5", "kd/seed3", "kd/seed5"]
  assert plan.rows == ["teacher", "scratch", "kd"]
  by_dir = {r.directory: r for r in plan.runs}
  assert by_dir["teacher"].config.seed == 0 and by_dir["teacher"].seed is None
  assert by_dir["teacher"].teacher_checkpoints == ()
  for seed in (3, 5):
    assert by_dir[f"kd/seed{seed}"].config.seed == seed
    assert by_dir[f"kd/seed{seed}"].seed == seed
    assert by_dir[f"kd/seed{seed}"].teacher_checkpoints == (_ckpt(workdir, "teacher"),)
    assert by_dir[f"scratch/seed{seed}"].teacher_checkpoints == ()
  for run in plan.runs:  # Suite-only fields are not part of a run's config.
    assert "seeds" not in run.config and "sweep" not in run.config


def test_without_seeds_the_layout_and_fingerprints_are_unchanged(tmp_path):
  plan, _ = _plan(tmp_path, "teacher,scratch,kd")
  assert [r.directory for r in plan.runs] == ["teacher", "scratch", "kd"]
  assert all(r.seed is None for r in plan.runs)
  # A config without the suite fields (as before they existed) gives the same fingerprints.
  old = _config("teacher,scratch,kd").to_dict()
  old.pop("seeds"), old.pop("sweep")
  import ml_collections
  old = ml_collections.ConfigDict(old)
  for run in plan.runs:
    assert config_fingerprint(run.config) == config_fingerprint(
        suite_lib.run_config(old, run.row))
  # Adding seeds later does not change the teacher run: it is not retrained.
  seeded, _ = _plan(tmp_path, "teacher,scratch,kd", seeds=(0, 1))
  assert config_fingerprint(seeded.runs[0].config) == config_fingerprint(plan.runs[0].config)


def test_born_again_generations_chain_each_on_the_previous_checkpoint(tmp_path):
  plan, workdir = _plan(tmp_path, "teacher,born_again", born_again__generations=3,
                        seeds=(0, 1))
  assert [r.directory for r in plan.runs] == [
      "teacher", "born_again_1/seed0", "born_again_1/seed1", "born_again_2/seed0",
      "born_again_2/seed1", "born_again_3/seed0", "born_again_3/seed1"]
  by_dir = {r.directory: r for r in plan.runs}
  for seed in (0, 1):
    first = by_dir[f"born_again_1/seed{seed}"]
    assert first.teacher_checkpoints == (_ckpt(workdir, "teacher"),)
    assert first.config.teacher.model == "cnn1d" and first.config.method == "born_again"
    for k in (2, 3):
      run = by_dir[f"born_again_{k}/seed{seed}"]
      assert run.teacher_checkpoints == (_ckpt(workdir, f"born_again_{k - 1}/seed{seed}"),)
      assert run.config.teacher.model == run.config.student.model == "mlp"
      assert run.config.born_again.generations == k and run.config.seed == seed
  assert [(e.name, e.seed, e.members) for e in plan.ensembles] == [
      ("born_again", s, (f"born_again_1/seed{s}", f"born_again_2/seed{s}",
                         f"born_again_3/seed{s}")) for s in (0, 1)]
  # A longer chain keeps the generations already trained (same configs, same fingerprints).
  longer, _ = _plan(tmp_path, "teacher,born_again", born_again__generations=4, seeds=(0, 1))
  assert len(longer.runs) == len(plan.runs) + 2
  for run in longer.runs:
    if run.directory in by_dir:
      old = by_dir[run.directory].config
      assert config_fingerprint(run.config) == config_fingerprint(old)
      if run.row != "teacher":
        assert run.config.to_dict() == old.to_dict()


def test_born_again_without_seeds_has_one_run_per_generation(tmp_path):
  plan, workdir = _plan(tmp_path, "teacher,born_again", born_again__generations=2)
  assert [(r.directory, r.teacher_checkpoints) for r in plan.runs] == [
      ("teacher", ()), ("born_again_1", (_ckpt(workdir, "teacher"),)),
      ("born_again_2", (_ckpt(workdir, "born_again_1"),))]
  assert [(e.seed, e.members) for e in plan.ensembles] == [
      (None, ("born_again_1", "born_again_2"))]


def test_born_again_without_its_first_teacher_is_refused_before_anything_runs(tmp_path):
  with pytest.raises(ConfigError, match="add 'teacher' to config.suite"):
    _plan(tmp_path, "born_again")


def test_a_sweep_is_one_row_per_value_with_typed_values_and_seeds(tmp_path):
  plan, workdir = _plan(tmp_path, "teacher,kd,dkd", sweep="kd.temperature=1, 2.5", seeds=(0, 1))
  assert [r.directory for r in plan.runs] == [
      "teacher", "kd@temperature=1/seed0", "kd@temperature=1/seed1",
      "kd@temperature=2.5/seed0", "kd@temperature=2.5/seed1", "dkd/seed0", "dkd/seed1"]
  by_dir = {r.directory: r for r in plan.runs}
  assert by_dir["kd@temperature=1/seed1"].config.kd.temperature == 1.0
  assert isinstance(by_dir["kd@temperature=1/seed1"].config.kd.temperature, float)
  assert by_dir["kd@temperature=2.5/seed0"].config.kd.temperature == 2.5
  assert by_dir["kd@temperature=2.5/seed0"].config.method == "kd"
  assert by_dir["dkd/seed0"].config.kd.temperature == 4.0  # Other rows keep the config's.
  int_plan, _ = _plan(tmp_path, "teacher,dkd", sweep="dkd.warmup_steps=0,5")
  assert [r.config.dkd.warmup_steps for r in int_plan.runs[1:]] == [0, 5]
  assert all(type(r.config.dkd.warmup_steps) is int for r in int_plan.runs[1:])


@pytest.mark.parametrize("fields,message", [
    (dict(sweep="kd.temperature"), r"config.sweep='kd.temperature' must read "
     r"'<method>.<field>=<v1>,<v2>,...'"),
    (dict(sweep="temperature=1,2"), r"must read '<method>.<field>="),
    (dict(sweep="kd.temprature=1,2"), r"config.kd has no field 'temprature'.*did you mean "
     r"'temperature'.*its fields: ce_weight, fused, kd_weight, temperature\."),
    (dict(sweep="dkd.beta=1,2"), r"sweeps 'dkd', which is not a run of "
     r"config.suite='teacher,kd'; sweep one of: teacher, kd\."),
    (dict(sweep="kd.temperature=1,hot"), r"\(kd.temperature\): 'hot' is not a float\."),
    (dict(sweep="kd.temperature=1,1"), r"repeats a value"),
    (dict(sweep="kd.temperature=1,,2"), r"has an empty value"),
    (dict(sweep="kd.temperature=-1,2"), r"config.kd.temperature must be"),
    (dict(seeds=(0, 0)), r"config.seeds=\(0, 0\) repeats a seed"),
    (dict(seeds=(0, -1)), r"every entry of config.seeds must be"),
    (dict(seeds=(0, 1.5)), r"every entry of config.seeds must be .*got 1.5"),
])
def test_bad_seeds_and_sweeps_are_one_line_errors_naming_the_field(tmp_path, fields, message):
  with pytest.raises(ConfigError, match=message) as error:
    _plan(tmp_path, "teacher,kd", **fields)
  assert "\n" not in str(error.value)


def test_born_again_cannot_be_swept(tmp_path):
  with pytest.raises(ConfigError, match=r"born_again cannot be swept"):
    _plan(tmp_path, "teacher,born_again", sweep="born_again.temperature=1,2")


def test_born_again_generations_must_be_a_positive_int(tmp_path):
  with pytest.raises(ConfigError, match=r"config.born_again.generations must be"):
    _plan(tmp_path, "teacher,born_again", born_again__generations=0)


def test_quickstart_variants():
  assert quickstart.get_config().seeds == ()
  assert quickstart.get_config("seeds").seeds == (0, 1, 2)
  assert quickstart.get_config("seeds").num_steps == quickstart.get_config().num_steps
  both = quickstart.get_config("smoke,seeds")
  assert both.seeds == (0, 1, 2) and both.num_steps == quickstart.get_config("smoke").num_steps
  with pytest.raises(ValueError, match="Unknown quickstart variant 'fast'"):
    quickstart.get_config("fast")


def test_born_again_loss_is_kd_to_the_previous_generation_in_float64():
  method = methods.get_method_class("born_again")(
      methods.get_method_class("born_again").default_config())
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 3
  where = np.array([True, True, False, True, True, False])
  labels = rng.integers(0, 5, size=6)

  @jax.jit  # One compilation instead of one per eager op.
  def loss_of(student, teacher, labels, where):
    batch = Batch(student=Output(student, {}), teacher=Output(teacher, {}), labels=labels,
                  where=where, step=jnp.zeros((), jnp.int32))
    return method.loss({}, {}, batch, methods.single_device_ops())[0]
  loss = loss_of(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                 jnp.asarray(labels, jnp.int32), jnp.asarray(where))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  # Paper defaults: CE 0, KD 1, T 1: KL(p_teacher || p_student) on the selected rows.
  log_t, log_s = log_softmax(teacher[where]), log_softmax(student[where])
  expected = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_aggregate_and_table_show_mean_std_and_count():
  results = {1: {"eval_accuracy": 0.8, "best_eval_accuracy": 0.82, "final_train_loss": 0.5,
                 "steps": 40, "method": "kd", "student": "mlp", "train_examples_per_sec": 1000.0},
             0: {"eval_accuracy": 0.7, "best_eval_accuracy": 0.71, "final_train_loss": 0.7,
                 "steps": 40, "method": "kd", "student": "mlp", "train_examples_per_sec": 3000.0}}
  row = suite_lib.aggregate_seeds(results)
  accuracies = np.array([0.7, 0.8], np.float64)
  assert row["eval_accuracy"] == pytest.approx(accuracies.mean(), abs=1e-15)
  assert row["std"]["eval_accuracy"] == pytest.approx(
      np.sqrt(((accuracies - accuracies.mean()) ** 2).sum() / (len(accuracies) - 1)), abs=1e-15)
  assert row["steps"] == 40 and row["method"] == "kd" and row["num_seeds"] == 2
  assert list(row["seeds"]) == ["0", "1"] and row["seeds"]["1"] == results[1]
  single = suite_lib.aggregate_seeds({4: results[0]})
  assert single["std"]["eval_accuracy"] == 0.0 and single["num_seeds"] == 1

  summary = {"runs": {
      "teacher": {"eval_accuracy": 0.9, "best_eval_accuracy": 0.9, "final_train_loss": 0.1,
                  "steps": 60, "method": "scratch", "student": "cnn1d",
                  "train_examples_per_sec": float("nan")},
      "kd": row},
      "ensembles": {"born_again": {"eval_accuracy": 0.7512, "num_seeds": 3, "generations": 2,
                                   "std": {"eval_accuracy": 0.01}, "method": "born_again",
                                   "student": "mlp"}}}
  lines = report.results_table(summary).splitlines()
  assert lines[2] == "| teacher | scratch | cnn1d | 0.9000 | 0.9000 | – | 0.1000 | 60 | – |"
  assert lines[3] == ("| kd | kd | mlp | 0.7500 ± 0.0707 (2) | 0.7650 ± 0.0778 (2) | – | "
                      "0.6000 | 40 | 2,000 |")
  assert lines[4] == ("| born_again ensemble (2) | born_again | mlp | 0.7512 ± 0.0100 (3) | – | "
                      "– | – | – | – |")


@pytest.mark.slow
def test_end_to_end_seeds_generations_and_a_sweep(tmp_path, data_dir):
  """The smoke quickstart: 2 seeds x (scratch, 2 born-again generations, a 2-value sweep)."""
  args = ["-m", "experiments.main", "--config=configs/quickstart.py:smoke",
          f"--workdir={tmp_path}", f"--config.data_dir={data_dir}",
          "--config.suite=teacher,scratch,born_again,kd", "--config.seeds=0,1",
          "--config.sweep=kd.temperature=2,4", "--config.num_steps=24",
          "--config.teacher.num_steps=24"]  # (ctkd needs num_steps >= 24.)
  result = run_python(args)
  summary = json.load(open(tmp_path / "summary.json"))
  runs = summary["runs"]
  assert list(runs) == ["teacher", "scratch", "born_again_1", "born_again_2",
                        "kd@temperature=2", "kd@temperature=4"]
  assert "seeds" not in runs["teacher"]
  for name in list(runs)[1:]:
    per_seed = [json.load(open(tmp_path / name / f"seed{s}" / "run_summary.json"))
                for s in (0, 1)]
    assert runs[name]["seeds"] == {"0": per_seed[0], "1": per_seed[1]}
    accuracies = np.array([r["eval_accuracy"] for r in per_seed], np.float64)
    assert runs[name]["eval_accuracy"] == pytest.approx(accuracies.mean())
    assert runs[name]["std"]["eval_accuracy"] == pytest.approx(accuracies.std(ddof=1))
  assert runs["kd@temperature=4"]["seeds"]["1"]["method"] == "kd"
  config = json.load(open(tmp_path / "kd@temperature=4" / "seed1" / "config.json"))
  assert config["kd"]["temperature"] == 4.0 and config["seed"] == 1

  # The born-again ensemble, recomputed in float64 from each generation's checkpoint.
  from kdjax import data, models
  from kdjax.train.checkpoint import load_model_variables
  pipeline = data.InputPipeline("mnist1d", global_batch_size=128, seed=0, data_dir=data_dir,
                                augment=False)
  batches = list(pipeline.eval_batches(1000))
  module = models.get_model("mlp", num_classes=10)
  sample = np.zeros((2,) + tuple(pipeline.spec.input_shape), np.float32)
  expected = jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0), sample))
  apply = models.apply_fn(module)
  ensembles = summary["ensembles"]["born_again"]
  for seed in (0, 1):
    probs, labels, masks = 0.0, [], []
    for k in (1, 2):
      variables = load_model_variables(
          str(tmp_path / f"born_again_{k}" / f"seed{seed}" / "checkpoints"), expected,
          model_name="mlp")
      logits = np.concatenate([np.asarray(apply(variables, b["inputs"], train=False)[0].logits,
                                          np.float64) for b in batches])
      e = np.exp(logits - logits.max(-1, keepdims=True))
      probs = probs + e / e.sum(-1, keepdims=True) / 2
    labels = np.concatenate([b["labels"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    accuracy = (probs.argmax(-1) == labels)[mask].mean()
    assert ensembles["seeds"][str(seed)]["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert ensembles["seeds"][str(seed)]["generations"] == 2
  assert "born_again ensemble (2)" in result.stdout
  report_md = open(tmp_path / "results.md").read()
  assert "| kd@temperature=2 | kd | mlp | " in report_md and " ± " in report_md

  # A rerun trains nothing and gives the same summary; a third generation reuses the first two.
  again = run_python(args)
  assert "step " not in again.stdout
  assert json.load(open(tmp_path / "summary.json"))["runs"] == runs
  longer = run_python(args + ["--config.born_again.generations=3", "--config.sweep=",
                              "--config.suite=teacher,born_again"])
  for seed in (0, 1):
    assert (tmp_path / "born_again_3" / f"seed{seed}" / "run_summary.json").exists()
  assert "[born_again_1/seed0] finished earlier" in longer.stdout
  assert json.load(open(tmp_path / "summary.json"))["ensembles"]["born_again"][
      "generations"] == 3
