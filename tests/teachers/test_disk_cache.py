"""The teacher-output cache: records, checks against the run, and a cached run equal to a live one."""

import json
import os

import numpy as np
import pytest

from conftest import set_fields
from configs import common
from kdjax.teachers import disk_cache as cache_lib
from kdjax.validation import ConfigError


def _config(**changes):
  config = common.base_config()
  config.num_steps = 3
  config.global_batch_size = 4
  return set_fields(config, changes)


def _write(directory, config, *, steps=3, topk=None, batch=4, num_classes=10, seed=0):
  """A cache of random logits; returns the records written (by step)."""
  rng = np.random.default_rng(seed)
  meta = dict(cache_lib.cache_identity(config, sampler="uniform"), topk=topk,
              feature_taps=["embedding"], feature_shapes={"embedding": [5]})
  writer = cache_lib.TeacherCacheWriter(directory, meta, steps_per_file=2)
  records = []
  for step in range(steps):
    logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
    inputs = rng.normal(size=(batch, 7)).astype(np.float32)
    record = {"index": np.arange(batch, dtype=np.int32) + 10 * step,
              "input_digest": cache_lib.input_digests(inputs),
              "features/embedding": rng.normal(size=(batch, 5)).astype(np.float32)}
    if topk is None:
      record["logits"] = logits
    else:
      order = np.argsort(-logits, axis=-1)[:, :topk]
      record["topk_logits"] = np.take_along_axis(logits, order, -1)
      record["topk_indices"] = order.astype(np.int32)
    writer.write(step, record)
    records.append((record, logits, inputs))
  writer.close()
  return records


def test_full_logits_read_back_as_all_or_top_k(tmp_path):
  records = _write(str(tmp_path), _config())
  local = slice(1, 3)
  record, logits, inputs = records[2]
  full = cache_lib.TeacherCache(str(tmp_path)).rows(
      2, local, index=record["index"][local], inputs=inputs[local])
  np.testing.assert_array_equal(full["teacher_logits"], logits[local])
  np.testing.assert_array_equal(full["teacher_features/embedding"],
                                record["features/embedding"][local])
  top3 = cache_lib.TeacherCache(str(tmp_path), topk=3).rows(2, local, index=record["index"][local])
  order = np.argsort(-logits[local], axis=-1)[:, :3]  # Independent: the 3 largest, descending.
  np.testing.assert_array_equal(top3["teacher_topk_indices"], order)
  np.testing.assert_array_equal(top3["teacher_topk_logits"],
                                np.take_along_axis(logits[local], order, -1))
  assert "teacher_logits" not in top3


def test_stored_top_k_is_truncated_and_never_widened(tmp_path):
  records = _write(str(tmp_path), _config(), topk=4)
  record, logits, _ = records[1]
  rows = cache_lib.TeacherCache(str(tmp_path), topk=2).rows(1, slice(0, 4), index=record["index"])
  np.testing.assert_array_equal(rows["teacher_topk_logits"], np.sort(logits, -1)[:, ::-1][:, :2])
  with pytest.raises(cache_lib.TeacherCacheError, match=r"cache_topk=5 .* only the top-4"):
    cache_lib.TeacherCache(str(tmp_path), topk=5)


def test_wrong_examples_or_inputs_are_refused(tmp_path):
  records = _write(str(tmp_path), _config())
  record, _, inputs = records[0]
  cache = cache_lib.TeacherCache(str(tmp_path))
  with pytest.raises(cache_lib.TeacherCacheError, match="examples differ"):
    cache.rows(0, slice(0, 4), index=record["index"] + 1)
  changed = inputs.copy()
  changed[3, 0] += 1e-6  # One pixel of one row: another augmentation.
  with pytest.raises(cache_lib.TeacherCacheError, match="augmented inputs differ"):
    cache.rows(0, slice(0, 4), index=record["index"], inputs=changed)
  with pytest.raises(cache_lib.TeacherCacheError, match="steps 0...2; step 3"):
    cache.rows(3, slice(0, 4), index=record["index"])


@pytest.mark.parametrize("field,value,named", [
    ("seed", 1, "seed=0, but this run has config.seed=1"),
    ("global_batch_size", 8, "global_batch_size=4, but this run has config.global_batch_size=8"),
    ("dataset", "cifar100", "config.dataset='cifar100'"),
    ("augment", False, "config.augment=False"),
    ("teacher.model", "mlp", "teacher_model='cnn1d', but this run has config.teacher.model='mlp'"),
    ("num_steps", 4, "covers 3 steps but config.num_steps=4"),
])
def test_cache_for_another_run_is_refused_naming_the_field(tmp_path, field, value, named):
  _write(str(tmp_path), _config())
  meta = cache_lib.read_meta(str(tmp_path))
  with pytest.raises(cache_lib.TeacherCacheError) as error:
    cache_lib.check_cache_matches(meta, _config(**{field: value}), sampler="uniform",
                                  num_steps=_config(**{field: value}).num_steps,
                                  directory=str(tmp_path))
  assert named in str(error.value) and "\n" not in str(error.value)
  cache_lib.check_cache_matches(meta, _config(), sampler="uniform", num_steps=3,
                                directory=str(tmp_path))  # The matching run passes.


def test_incomplete_or_missing_cache_is_refused(tmp_path):
  _write(str(tmp_path), _config())
  os.remove(os.path.join(tmp_path, cache_lib.META_FILE))
  with pytest.raises(cache_lib.TeacherCacheError, match="did not finish"):
    cache_lib.read_meta(str(tmp_path))
  with pytest.raises(cache_lib.TeacherCacheError, match="does not exist"):
    cache_lib.read_meta(str(tmp_path / "nowhere"))


def test_validate_config_checks_cache_fields_and_method(tmp_path):
  from kdjax.train.validate import validate_config
  directory = str(tmp_path / "cache")
  _write(directory, _config(), topk=3)
  validate_config(_config(**{"teacher.cache": directory}), num_devices=1)  # kd learns from top-k.
  with pytest.raises(ConfigError, match="method 'dkd' needs all 10 logits"):
    validate_config(_config(**{"teacher.cache": directory, "method": "dkd"}), num_devices=1)
  with pytest.raises(ConfigError, match="cannot learn from cached"):
    validate_config(_config(**{"teacher.cache": directory, "method": "meal_v2"}),
                    num_devices=1)
  with pytest.raises(ConfigError, match=r"config.teacher.cache_topk must be an integer >= 0"):
    validate_config(_config(**{"teacher.cache_topk": -1}), num_devices=1)
  with pytest.raises(ConfigError, match=r"config.prefetch must be an integer >= 0, got -1"):
    validate_config(_config(prefetch=-1), num_devices=1)


@pytest.mark.slow
def test_cached_run_equals_live_run_and_never_builds_the_teacher(tmp_path, data_dir,
                                                                  monkeypatch):
  """A smoke teacher, its full-logit cache, then kd live and kd cached: the same numbers."""
  from configs import quickstart
  from experiments import cache_teacher, cli
  from kdjax import train
  from kdjax.teachers import live as teachers

  config = quickstart.get_config("smoke")
  config.data_dir, config.progress = data_dir, False
  config.num_steps, config.teacher.num_steps, config.eval_every_steps = 24, 24, 24
  config.log_every_steps = config.checkpoint_every_steps = 24
  workdir = str(tmp_path / "live")
  config.suite = "teacher,kd"
  live = train.run_suite(config, workdir, num_devices=1)
  with pytest.raises(cli.UsageError, match="has no tap 'stage9'; its taps: .*embedding"):
    cache_teacher.write_cache(config, workdir, features=["stage9"])
  summary = cache_teacher.write_cache(config, workdir, topk=0, features=["embedding"])
  assert summary["steps"] == 24 and summary["topk"] is None
  with pytest.raises(cli.UsageError, match="exists; pass --overwrite"):
    cache_teacher.write_cache(config, workdir)

  def no_teacher(*args, **kwargs):
    raise AssertionError("the teacher was loaded although the run reads a cache")

  monkeypatch.setattr(teachers, "load_teachers", no_teacher)
  config.suite = "kd"
  config.teacher.checkpoint = os.path.join(workdir, "teacher", "checkpoints")
  config.teacher.cache = summary["directory"]
  cached = train.run_suite(config, str(tmp_path / "cached"), num_devices=1)
  live_kd, cached_kd = live["runs"]["kd"], cached["runs"]["kd"]
  np.testing.assert_allclose(cached_kd["final_train_loss"], live_kd["final_train_loss"],
                             rtol=1e-5)
  assert cached_kd["eval_accuracy"] == pytest.approx(live_kd["eval_accuracy"], abs=2e-3)
  with open(os.path.join(summary["directory"], cache_lib.META_FILE)) as f:
    assert json.load(f)["feature_shapes"] == {"embedding": [100]}

  # The cache holds the teacher as the config runs it: in bfloat16 with teacher.dtype set
  # (the stored logits then differ from float32's by bfloat16 rounding, not more).
  float32_logits = cache_lib.TeacherCache(summary["directory"])._record(5)["logits"]  # pylint: disable=protected-access
  config.teacher.cache, config.teacher.dtype = "", "bfloat16"
  bf16 = cache_teacher.write_cache(config, workdir, topk=0, overwrite=True)
  with open(os.path.join(bf16["directory"], cache_lib.META_FILE)) as f:
    assert json.load(f)["teacher_dtype"] == "bfloat16"
  bf16_logits = cache_lib.TeacherCache(bf16["directory"])._record(5)["logits"]  # pylint: disable=protected-access
  assert not np.array_equal(bf16_logits, float32_logits)
  scale = np.abs(float32_logits).max()
  np.testing.assert_allclose(bf16_logits, float32_logits, atol=0.05 * scale)
