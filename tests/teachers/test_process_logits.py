"""Cached LM teacher logits (`kdjax.teachers.process_logits`): what the train and eval steps read from
the cache equals what the live teacher computes, the rows of a process share one cache, and only
the methods whose teacher sees the batch's own tokens train from it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdjax import methods as methods_lib
from kdjax import models as models_lib
from kdjax.data import lm_pipeline, sources, text_catalog
from kdjax.teachers import process_logits as teacher_logits
from kdjax.methods.base import Batch, RunFacts, single_device_ops
from kdjax.methods.eval_metrics import CLASSIFICATION_METRICS
from kdjax.train import state as state_lib
from kdjax.train import step as step_lib
from kdjax.validation import ConfigError
from configs import lm_quickstart

T = 32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds_text"))
  sources.ensure_prepared(text_catalog.get_text_dataset_spec("pydoc"), directory)
  return lm_pipeline.LMInputPipeline("pydoc", global_batch_size=4, seed=0, sequence_length=T,
                                     data_dir=directory)


@pytest.fixture(scope="module")
def teacher():
  """lm_tiny at a random initialisation: (apply, variables)."""
  fns = models_lib.get_model_fns("lm_tiny", num_classes=259)
  return fns.apply, jax.device_get(fns.init(jax.random.PRNGKey(1), np.zeros((2, T), np.int32)))


def _config(storage="float32", method="kd", num_steps=3):
  config = lm_quickstart.get_config("smoke")
  config.lm.sequence_length = T
  config.lm.teacher_logits = storage
  config.method, config.num_steps = method, num_steps
  return config


def _method(name):
  config = _config(method=name)
  return methods_lib.build_method(config, num_train_examples=100)


def _live(teacher, tokens):
  apply, variables = teacher
  return np.asarray(jax.jit(lambda v, t: apply(v, t, train=False)[0].logits)(variables, tokens))


@pytest.fixture
def fresh_pipeline(pipeline):
  """The module's pipeline with nothing attached before and after the test."""
  pipeline.attach_teacher_logits(None, key="teacher_logits", train=False, evaluate=False)
  teacher_logits._SHARED.clear()
  yield pipeline
  pipeline.attach_teacher_logits(None, key="teacher_logits", train=False, evaluate=False)
  teacher_logits._SHARED.clear()


def test_methods_that_train_from_the_cache():
  """The teacher must see the batch's own tokens: not DistiLLM's student samples, not SeqKD's
  teacher continuations; AdaSPEC only adds its reference's logits, GKD replaces the cached
  logits on its on-policy steps."""
  trains = {name: teacher_logits.trains_from_cache(_method(name).teacher_needs)
            for name in ("kd", "fkl", "jsd", "adaspec", "scratch", "gkd", "seq_kd", "distillm")}
  assert trains == {"kd": True, "fkl": True, "jsd": True, "adaspec": True, "scratch": False,
                    "gkd": True, "seq_kd": False, "distillm": False}
  assert all(teacher_logits.evaluates_from_cache(_method(name).teacher_needs) for name in trains)


@pytest.mark.parametrize("storage, atol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_batches_carry_the_live_teachers_logits(fresh_pipeline, teacher, storage, atol):
  """Train batches (of the steps asked for), eval batches (the padded last one included) and
  validation-style lookups: the live teacher's logits on the same tokens, to the storage
  dtype's rounding."""
  config = _config(storage)
  cache = teacher_logits.attach(config, _method("kd"), fresh_pipeline, *teacher)
  for step in (0, 2):
    batch = fresh_pipeline.train_batch(step)
    assert batch["teacher_logits"].dtype == np.float32
    assert batch["teacher_logits"].shape == batch["tokens"].shape + (259,)
    np.testing.assert_allclose(batch["teacher_logits"], _live(teacher, batch["tokens"]),
                               atol=atol, rtol=0)
  batches = list(fresh_pipeline.eval_batches(64))
  for batch in (batches[0], batches[-1]):
    np.testing.assert_allclose(batch["teacher_logits"], _live(teacher, batch["tokens"]),
                               atol=atol, rtol=0)
  # Only the windows of steps [0, num_steps) and the eval split were computed.
  assert set(cache._rows["train"]) == set(fresh_pipeline.train_window_indices(0, 3).tolist())
  assert len(cache._rows["eval"]) == fresh_pipeline.num_eval_examples


def test_the_rows_of_a_process_share_one_cache(fresh_pipeline, teacher):
  """A second run with the same teacher and windows reuses the logits (no teacher pass); other
  teacher variables give a new cache."""
  first = teacher_logits.attach(_config(), _method("kd"), fresh_pipeline, *teacher)
  calls = []
  forward = first._forward
  first._forward = lambda *args: calls.append(1) or forward(*args)
  second = teacher_logits.attach(_config(method="fkl"), _method("fkl"), fresh_pipeline, *teacher)
  assert second is first and not calls
  apply, variables = teacher
  other = jax.tree.map(lambda x: x * 1.5, variables)
  assert teacher_logits.attach(_config(), _method("kd"), fresh_pipeline, apply, other) is not first


def test_scratch_and_seq_kd_evaluate_from_the_cache_but_train_live(fresh_pipeline, teacher):
  for name in ("scratch", "seq_kd"):
    teacher_logits.attach(_config(method=name), _method(name), fresh_pipeline, *teacher)
    assert "teacher_logits" not in fresh_pipeline.train_batch(0)
    assert "teacher_logits" in next(fresh_pipeline.eval_batches(64))


def test_off_attaches_nothing(fresh_pipeline, teacher):
  assert teacher_logits.attach(_config(""), _method("kd"), fresh_pipeline, *teacher) is None
  assert "teacher_logits" not in fresh_pipeline.train_batch(0)
  assert "teacher_logits" not in next(fresh_pipeline.eval_batches(64))


def test_bad_dtype_and_oversized_caches_are_refused(fresh_pipeline, teacher, monkeypatch):
  with pytest.raises(ConfigError, match=r"config.lm.teacher_logits='float64'; valid: ''"):
    teacher_logits.attach(_config("float64"), _method("kd"), fresh_pipeline, *teacher)
  monkeypatch.setattr(teacher_logits, "MAX_BYTES", 1024)
  with pytest.raises(ConfigError, match="over the .* limit; use ''"):
    teacher_logits.attach(_config(), _method("kd"), fresh_pipeline, *teacher)


@pytest.mark.parametrize("name", ["kd", pytest.param("adaspec", marks=pytest.mark.slow),
                                  pytest.param("gkd", marks=pytest.mark.slow)])
def test_a_cached_step_equals_the_live_step(fresh_pipeline, teacher, name):
  """The KD (AdaSPEC, on-policy GKD) train step and the eval step on a batch with cached
  logits give the live teacher's loss, metrics and updated parameters."""
  config = _config(method=name)
  config.gkd.lmbda = 1.0  # Every step on-policy: the teacher must see the student's samples.
  student = models_lib.get_model_fns("lm_tiny", num_classes=259)
  student_variables = jax.device_get(student.init(jax.random.PRNGKey(2),
                                                  np.zeros((2, T), np.int32)))
  method = methods_lib.build_method(config, RunFacts(
      num_train_examples=100, reference_variables=(
          jax.tree.map(lambda x: x * 0.9, student_variables) if name == "adaspec" else None)))
  apply, variables = teacher
  out, _ = student.apply(student_variables, np.zeros((2, T), np.int32), train=False)
  method_params, method_state = method.init(jax.random.PRNGKey(0), Batch(
      student=out, teacher=out, labels=np.zeros((2, T), np.int32), where=np.ones((2, T), bool),
      step=jnp.zeros((), jnp.int32), teacher_variables=variables,
      student_variables=student_variables))
  optimizer = optax.adamw(1e-3)
  state = state_lib.create(student_variables=student_variables, method_params=method_params,
                           method_state=method_state, optimizer=optimizer,
                           rng=jax.random.PRNGKey(3))
  make = step_lib.make_train_step(student_apply=student.apply, teacher_apply=apply,
                                  method=method, optimizer=optimizer)
  train_step = jax.jit(lambda state, variables, batch: make(state, variables, batch,
                                                            single_device_ops()))
  teacher_logits.attach(config, method, fresh_pipeline, apply, variables)
  cached = fresh_pipeline.train_batch(1)
  live = {k: v for k, v in cached.items() if k != "teacher_logits"}
  results = [train_step(state, variables, batch) for batch in (cached, live)]
  (cached_state, cached_metrics), (live_state, live_metrics) = results
  if name == "gkd":
    assert float(live_metrics["on_policy"]) == 1.0
  for key in live_metrics:
    np.testing.assert_allclose(cached_metrics[key], live_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               cached_state.params, live_state.params)
  eval_step = jax.jit(step_lib.make_eval_step(student_apply=student.apply, teacher_apply=apply,
                                              metrics=CLASSIFICATION_METRICS))
  batch = next(fresh_pipeline.eval_batches(64))
  sums = [eval_step(state, variables, b) for b in
          (batch, {k: v for k, v in batch.items() if k != "teacher_logits"})]
  for key in sums[1]:
    np.testing.assert_allclose(sums[0][key], sums[1][key], rtol=1e-5, err_msg=key)
