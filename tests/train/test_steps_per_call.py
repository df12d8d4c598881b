"""`config.steps_per_call`: several train steps in one jitted call (a `lax.scan` over steps
that make their batches on the devices), against one step a call."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from conftest import SMOKE, run_python
from kdjax import data, methods, models
from kdjax.data import device_batches
from kdjax.train import parallel as parallel_lib, state as state_lib, step as step_lib
from kdjax.train.bookkeeping import MetricsWindow, call_length
import test_resume


def _pure_step(method_name="kd"):
  student = models.get_model("mlp", num_classes=10)
  teacher = models.get_model("cnn1d", num_classes=10)
  sample = np.zeros((2, 40), np.float32)
  method_class = methods.get_method_class(method_name)
  optimizer = optax.adam(1e-2)
  state = state_lib.create(
      student_variables=models.init_variables(student, jax.random.key(1), sample),
      method_params={}, method_state={}, optimizer=optimizer, rng=jax.random.PRNGKey(0))
  teacher_variables = models.init_variables(teacher, jax.random.key(2), sample)
  pure = step_lib.make_train_step(
      student_apply=models.apply_fn(student), teacher_apply=models.apply_fn(teacher),
      method=method_class(method_class.default_config()), optimizer=optimizer)
  return pure, state, teacher_variables


def test_one_call_of_n_steps_is_n_calls_of_one_step(data_dir):
  pipeline = data.InputPipeline("mnist1d", global_batch_size=32, seed=3, data_dir=data_dir,
                                augment=True)
  parallel = parallel_lib.JitParallel()
  # Windows of 6 steps: the call of steps 4..7 does not fit the first window (0..5) and
  # starts a new one.
  batches = device_batches.DeviceBatches(pipeline, put=parallel.put_replicated, num_steps=100,
                                         window_steps=6, steps_per_call=4)
  pure, state, teacher_variables = _pure_step()
  state = jax.device_get(state)  # Each run donates its own device copy.
  one = parallel.compile_train_step(pure, make_batch=batches.make_batch)
  four = parallel.compile_train_step(pure, make_batch=batches.make_batch, steps_per_call=4)
  single_state, single_metrics = parallel.put_state(state), []
  for step in range(8):
    single_state, metrics = one(single_state, teacher_variables, batches.get(step))
    single_metrics.append(jax.device_get(metrics))
  multi_state, stacked = parallel.put_state(state), []
  for step in (0, 4):
    multi_state, metrics = four(multi_state, teacher_variables, batches.get(step, 4))
    stacked.append(jax.device_get(metrics))
  assert int(multi_state.step) == int(single_state.step) == 8
  for key in ("loss", "kd", "ce", "grad_norm"):
    got = np.concatenate([m[key] for m in stacked])
    assert got.shape == (8,)
    # The same batches and rng folds; XLA fuses the loop body differently, so float rounding.
    np.testing.assert_allclose(got, [m[key] for m in single_metrics], rtol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(multi_state.params), jax.device_get(single_state.params))


def test_a_call_never_reads_past_its_window_and_only_device_batches_run_several_steps(
    data_dir):
  pipeline = data.InputPipeline("mnist1d", global_batch_size=32, seed=3, data_dir=data_dir)
  parallel = parallel_lib.JitParallel()
  batches = device_batches.DeviceBatches(pipeline, put=parallel.put_replicated, num_steps=100,
                                         window_steps=3)
  with pytest.raises(ValueError, match=r"4 steps from one window of 3 steps"):
    batches.get(0, 4)
  assert device_batches.DeviceBatches(pipeline, put=parallel.put_replicated, num_steps=100,
                                      window_steps=3, steps_per_call=8).window_steps == 8
  pure, _, _ = _pure_step()
  with pytest.raises(ValueError, match=r"steps_per_call=4 needs batches made on the devices"):
    parallel.compile_train_step(pure, steps_per_call=4)
  with pytest.raises(ValueError, match=r"parallel 'pmap' takes per-device host batches"):
    parallel_lib.PmapParallel().compile_train_step(pure, steps_per_call=4)


def test_calls_end_on_multiples_of_steps_per_call_or_at_the_end():
  def lengths(start, total, per_call):
    out, step = [], start
    while step < total:
      out.append(call_length(step, total, per_call))
      step += out[-1]
    return out
  assert lengths(0, 25, 10) == [10, 10, 5]
  assert lengths(15, 40, 10) == [5, 10, 10]  # Resumed mid-call: realigns.
  assert lengths(7, 9, 1) == [1, 1]
  assert lengths(0, 3, 10) == [3]


def test_stacked_metrics_are_logged_step_by_step():
  parallel = parallel_lib.JitParallel()
  stacked = {"loss": jax.numpy.array([1.0, 2.0, np.nan]), "grad_norm": jax.numpy.ones(3)}
  window = MetricsWindow(parallel)
  window.add(2, {"loss": jax.numpy.array(0.5), "grad_norm": jax.numpy.array(1.0)})
  window.add(5, stacked, num_steps=3)
  seen = []
  window.flush(lambda step, bad, host: seen.append((step, bad, host["loss"])))
  assert [m["loss"] for m in window.window[:3]] == [0.5, 1.0, 2.0]
  assert len(window.window) == 4
  assert len(seen) == 1 and seen[0][:2] == (5, ["loss"])  # Step 5 is the third of 3..5.


# A scratch MLP on MNIST-1D with device batches: 25 steps, no evaluation but the last.
RUN = SMOKE + ["--config.suite=scratch", "--config.device_batches=True",
                           "--config.num_steps=25", "--config.eval_every_steps=50",
                           "--config.progress=False"]


def _run(workdir, data_dir, *overrides):
  result = run_python(RUN + [f"--workdir={workdir}", f"--config.data_dir={data_dir}",
                             *overrides])
  with open(os.path.join(workdir, "scratch", "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  params = test_resume._final_state(os.path.join(workdir, "scratch"))["params"]  # pylint: disable=protected-access
  return result.stdout, lines, params


def test_runs_with_several_steps_a_call_train_as_one_step_a_call(tmp_path, data_dir):
  # One step a call, logging every 5 steps and saving at 15 (and 25).
  _, one_lines, one_params = _run(tmp_path / "one", data_dir, "--config.log_every_steps=5",
                                  "--config.checkpoint_every_steps=15")
  # Ten a call: calls of 10, 10 and 5 (the end of the run).
  _, ten_lines, ten_params = _run(tmp_path / "ten", data_dir, "--config.steps_per_call=10",
                                  "--config.log_every_steps=10",
                                  "--config.checkpoint_every_steps=10")
  # The one-step run resumed at its step-15 checkpoint with ten a call: calls of 5 (back on
  # the multiples of 10) and 5 (the end). steps_per_call, log and checkpoint intervals are not
  # part of the run's identity, so the resume is accepted.
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "one", resumed)
  os.remove(resumed / "scratch" / "run_summary.json")
  shutil.rmtree(resumed / "scratch" / "checkpoints" / "25")
  out, resumed_lines, resumed_params = _run(resumed, data_dir, "--config.steps_per_call=10",
                                            "--config.log_every_steps=10",
                                            "--config.checkpoint_every_steps=10",
                                            "--config.progress=True")
  assert "resumed from step 15" in out

  def logged(lines, split="train"):
    return {line["step"]: line for line in lines if line["split"] == split}
  assert sorted(logged(ten_lines)) == [10, 20, 25]
  assert sorted(logged(resumed_lines)) == [5, 10, 15, 20, 25]
  assert sorted(logged(one_lines)) == [5, 10, 15, 20, 25]
  # Each logged mean covers the steps since the last line, whatever the calls.
  one, ten, res = logged(one_lines), logged(ten_lines), logged(resumed_lines)
  np.testing.assert_allclose(ten[10]["loss"], (one[5]["loss"] + one[10]["loss"]) / 2, rtol=1e-4)
  np.testing.assert_allclose(ten[25]["loss"], one[25]["loss"], rtol=1e-4)
  np.testing.assert_allclose(res[20]["loss"], one[20]["loss"], rtol=1e-4)
  for params in (ten_params, resumed_params):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 params, one_params)
  final = lambda lines: logged(lines, "eval")[25]["accuracy"]
  assert abs(final(ten_lines) - final(one_lines)) <= 0.003
  assert abs(final(resumed_lines) - final(one_lines)) <= 0.003


def test_the_loop_makes_calls_of_k_steps_and_leaves_their_compiles_out_of_throughput(
    monkeypatch, tmp_path, data_dir):
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from kdjax.train import bookkeeping, loop  # pylint: disable=g-import-not-at-top
  calls, restarts = [], []
  train_steps, restart = loop._Run.train_steps, bookkeeping.Throughput.restart  # pylint: disable=protected-access
  monkeypatch.setattr(loop._Run, "train_steps",  # pylint: disable=protected-access
                      lambda run, num: (calls.append(num), train_steps(run, num))[1])
  monkeypatch.setattr(bookkeeping.Throughput, "restart",
                      lambda self, step: (restarts.append(step), restart(self, step))[1])
  config = quickstart.get_config("smoke")
  config.method, config.suite, config.progress, config.data_dir = "scratch", "", False, data_dir
  config.device_batches, config.steps_per_call, config.num_steps = True, 10, 25
  config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 10, 50, 10
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert calls == [10, 10, 5] and summary["steps"] == 25
  # Each call length compiles once, on its first call; throughput counts from after it.
  assert restarts == [10, 25]


def test_throughput_restart_drops_the_interval_since_the_last_mark(monkeypatch):
  from kdjax.train import bookkeeping  # pylint: disable=g-import-not-at-top
  clock = iter([0.0, 1.0, 101.0, 102.0])
  monkeypatch.setattr(bookkeeping.time, "perf_counter", lambda: next(clock))
  throughput = bookkeeping.Throughput(global_batch_size=10, start_step=0)
  throughput.mark(10)     # t=0: the first mark (compilation before it is not counted).
  throughput.mark(20)     # t=1: 10 steps in 1 s.
  throughput.restart(25)  # t=101: a compile; steps 20..25 and their 100 s are dropped.
  throughput.mark(35)     # t=102: 10 steps in 1 s.
  assert throughput.examples_per_sec == 10 * 20 / 2.0
