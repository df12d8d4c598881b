"""A new method touches only its own code and one config: this file is that method's module.

`CachedViewsEMA` needs (1) a cached teacher (its top-k logits read from an on-disk cache
written by `experiments.cache_teacher`: the teacher never runs), (2) an extra input view of
the batch seen by the student, and (3) an update after the optimizer step (an EMA of the
student's parameters in the method state). It declares all three on the class
(`teacher_needs`, `views`, `update_after_step`; and a final metric, `final_metrics`) and joins the library with `register`; no
file under kdjax/ knows its name.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import copy_runs
from kdjax import losses, methods
from kdjax.methods import base


class CachedViewsEMA(base.Method):
  """KD from a top-k teacher cache + CE on a noisy view + an EMA of the student's weights."""
  name = "cached_views_ema_for_test"
  teacher_needs = base.TeacherNeeds(cache="topk")  # A top-k cache suffices for KD.
  positive_fields = ("temperature", "decay")

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(temperature=4.0, decay=0.9, noise=0.1))

  def init(self, rng, sample):
    del rng
    return {}, {"ema": sample.student_variables["params"], "updates": jnp.int32(0)}

  def views(self, batch, rng):
    noise = jax.random.normal(rng, batch["inputs"].shape) * self.config.noise
    return {"noisy": batch["inputs"] + noise}

  def loss(self, params, state, batch, ops):
    kd = ops.mean(losses.kd(batch.student.logits, batch.teacher.logits,
                            temperature=self.config.temperature, where=batch.where),
                  batch.where)
    noisy = batch.data[base.STUDENT_VIEW_PREFIX + "noisy"]
    view_ce = base.cross_entropy(dataclasses_replace(batch, student=noisy), ops)
    loss = kd + view_ce
    return loss, {"loss": loss, "kd": kd, "view_ce": view_ce,
                  "accuracy": base.accuracy(batch, ops),
                  "ema_updates": state["updates"].astype(jnp.float32)}, state

  def update_after_step(self, state, student_variables, step, *, method_params):
    del step, method_params
    decay = self.config.decay
    ema = jax.tree.map(lambda e, s: decay * e + (1 - decay) * s, state["ema"],
                       student_variables["params"])
    return {"ema": ema, "updates": state["updates"] + 1}


  def final_metrics(self, student_apply, student_variables):
    # A metric of the finished student that no eval batch gives: here its output on zeros.
    zeros = jnp.zeros((1, 40), jnp.float32)
    return {"eval_logit_at_zero": float(student_apply(student_variables, zeros,
                                                      train=False)[0].logits[0, 0])}


def dataclasses_replace(batch, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(batch, **changes)


@pytest.fixture
def registered():
  methods.register(CachedViewsEMA, replace=True)
  yield CachedViewsEMA
  methods.registry.METHODS.pop(CachedViewsEMA.name, None)


def test_a_method_with_a_cached_teacher_views_and_an_after_step_update_runs_from_one_config(
    registered, smoke_suite, data_dir, tmp_path, monkeypatch):
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from experiments import cache_teacher  # pylint: disable=g-import-not-at-top
  from kdjax import train  # pylint: disable=g-import-not-at-top
  from kdjax.teachers import live  # pylint: disable=g-import-not-at-top
  from kdjax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top

  smoke_workdir, _ = smoke_suite
  workdir = copy_runs(smoke_workdir, tmp_path / "suite", ["teacher"])
  # The one config: the smoke quickstart with the new method's row and its block.
  config = quickstart.get_config("smoke")
  config.data_dir, config.progress = data_dir, False
  config.method = registered.name
  config[registered.name] = registered.default_config()
  config.num_steps, config.log_every_steps = 20, 10
  config.eval_every_steps = config.checkpoint_every_steps = 20
  cache = cache_teacher.write_cache(config, workdir, topk=3)
  assert cache["topk"] == 3 and cache["steps"] == 20

  def no_teacher(*args, **kwargs):
    raise AssertionError("the teacher was loaded although the run reads a cache")

  monkeypatch.setattr(live, "load_teachers", no_teacher)
  config.suite = registered.name
  config.teacher.cache = cache["directory"]
  config.teacher.checkpoint = os.path.join(workdir, "teacher", "checkpoints")
  summary = train.run_suite(config, str(tmp_path / "student"), num_devices=1)
  result = summary["runs"][registered.name]
  assert result["steps"] == 20 and np.isfinite(result["final_train_loss"])
  assert np.isfinite(result["eval_logit_at_zero"])  # Method.final_metrics reached the summary.
  for name in ("results.md", "results.csv", "results.png"):  # run_suite writes the report.
    assert (tmp_path / "student" / name).stat().st_size > 0, name
  lines = [l for l in read_metrics(str(tmp_path / "student" / registered.name))
           if l["split"] == "train"]
  # The EMA moved after every step: a line logs the mean over its 10 steps of the count of
  # updates before each step (0..9, then 10..19).
  assert [l["ema_updates"] for l in lines] == [4.5, 14.5]
  assert all(l["kd"] > 0 and l["view_ce"] > 0 for l in lines)
