"""Language-model configs and teachers: mistakes are refused before any work, with both sizes
named; an exported teacher file round-trips."""

import jax
import numpy as np
import pytest

from conftest import set_fields
from configs import lm_quickstart, lm_teacher
from kdjax import models
from kdjax.train import checkpoint
from kdjax.train.validate import ConfigError, validate_config


def _config(**changes):
  config = lm_quickstart.get_config("smoke")
  return set_fields(config, changes)


def test_lm_quickstart_and_teacher_configs_validate():
  validate_config(lm_quickstart.get_config("smoke"), num_devices=1)
  validate_config(lm_teacher.get_config("smoke"), num_devices=1)


@pytest.mark.parametrize("changes, message", [
    ({"num_classes": 300}, r"config.num_classes=300 but the byte tokenizer has 259 tokens"),
    ({"lm.vocab_size": 512}, r"config.lm.vocab_size=512 but the byte tokenizer has 259"),
    ({"lm.tokenizer": "bpe", "lm.vocab_size": 0}, r"config.lm.vocab_size must be a positive"),
    ({"lm.tokenizer": "wordpiece"}, r"config.lm.tokenizer='wordpiece' is not valid"),
    ({"lm.sequence_length": 600}, r"config.lm.sequence_length=600 is longer than model "
                                  r"'lm_tiny' can read \(max_length 512\)"),
    ({"student.model": "resnet8"}, r"takes image32 inputs but dataset 'pydoc' has tokens"),
])
def test_lm_config_mistakes_name_the_field_and_both_sizes(changes, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(_config(**changes), num_devices=1)


def test_teacher_of_another_vocabulary_is_refused_naming_both_shapes(tmp_path):
  tokens = np.zeros((2, 8), np.int32)
  other = models.init_variables(models.get_model("lm_tiny", num_classes=300),
                                jax.random.PRNGKey(0), tokens)
  path = str(tmp_path / "teacher.msgpack")
  checkpoint.export_model_variables(other, path, model_name="lm_tiny")
  expected = jax.eval_shape(lambda: models.init_variables(
      models.get_model("lm_tiny", num_classes=259), jax.random.PRNGKey(0), tokens))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"embedding.*checkpoint \(300, 32\) vs model \(259, 32\)"):
    checkpoint.load_exported_variables(path, expected, model_name="lm_tiny")
  with pytest.raises(checkpoint.CheckpointError, match="of model 'lm_tiny', but the teacher is "
                     "configured as 'lm_student'"):
    checkpoint.load_exported_variables(path, expected, model_name="lm_student")


def test_exported_model_round_trips_in_bfloat16(tmp_path):
  tokens = np.zeros((2, 8), np.int32)
  variables = models.init_variables(models.get_model("lm_tiny", num_classes=259),
                                    jax.random.PRNGKey(0), tokens)
  path = str(tmp_path / "m.msgpack")
  size = checkpoint.export_model_variables(variables, path, model_name="lm_tiny",
                                           dtype="bfloat16", meta={"note": "test"})
  assert size < 0.6 * 4 * 28_928 + 4096  # About half of the float32 parameters' bytes.
  loaded = checkpoint.load_exported_variables(path, variables, model_name="lm_tiny")
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)  # bfloat16 rounding.
  assert checkpoint.exported_meta(path) == {"note": "test"}
