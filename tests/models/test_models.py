"""Model registry, Output contract, apply functions and the RepDistiller parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from kdjax import models


@pytest.mark.parametrize("name, expected", [("resnet8x4", 1_233_540), ("resnet32x4", 7_433_860)])
def test_cifar_resnet_parameter_counts_match_repdistiller(name, expected):
  module = models.get_model(name, num_classes=100)
  variables = jax.eval_shape(
      lambda: models.init_variables(module, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert models.count_params(variables["params"]) == expected


# LMs: test_transformer_lm.py; diffusion denoisers (image8, dict inputs): tests/diffusion/.
@pytest.mark.parametrize("name", sorted(n for n in models.MODELS
                                     if models.registry.model_input_kind(n)
                                     not in ("tokens", "image8")))
def test_every_model_returns_output_with_embedding(name):
  inputs = jnp.zeros({"image32": (2, 32, 32, 3), "image224": (2, 224, 224, 3),
                      "signal1d": (2, 40)}[models.registry.model_input_kind(name)])
  module = models.get_model(name, num_classes=7)
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), inputs))
  output, _ = jax.eval_shape(
      lambda v: models.apply_fn(module)(v, inputs, train=False), variables)
  assert isinstance(output, models.Output)
  assert output.logits.shape == (2, 7)
  assert "embedding" in output.features and output.features["embedding"].shape[0] == 2


def test_apply_fn_updates_batch_stats_only_in_training():
  module = models.get_model("resnet8", num_classes=10)
  inputs = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  # Drawn with numpy in init's shapes: flax's initializers, op by op, took ~12 s here.
  variables = random_variables(lambda: models.init_variables(module, jax.random.key(0), inputs))
  apply = models.apply_fn(module)
  _, new_state = apply(variables, inputs, train=True)
  assert set(new_state) == {"batch_stats"}
  before = variables["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(new_state["batch_stats"]["stem_bn"]["mean"], before)
  _, eval_state = apply(variables, inputs, train=False)
  assert eval_state == {}


def test_cifar_resnet_taps_have_documented_shapes():
  module = models.get_model("resnet8x4", num_classes=100)
  inputs = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), inputs))
  output, _ = jax.eval_shape(lambda v: models.apply_fn(module)(v, inputs, train=False),
                             variables)
  shapes = {k: v.shape for k, v in output.features.items()}
  assert shapes == {"stem": (2, 32, 32, 32), "stage1": (2, 32, 32, 64),
                    "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256), "embedding": (2, 256),
                    "stage1_preact": (2, 32, 32, 64), "stage2_preact": (2, 16, 16, 128),
                    "stage3_preact": (2, 8, 8, 256)}


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet9000'; valid models: .*cnn1d.*mlp"):
    models.get_model("resnet9000", num_classes=10)


def test_importing_losses_pulls_in_nothing_but_jax():
  from conftest import run_python
  code = ("import sys; from kdjax import losses; "
          "heavy = [m for m in ('flax', 'tensorflow_datasets', 'optax', 'orbax', 'grain', "
          "'ml_collections', 'kdjax.train', 'kdjax.models') if m in sys.modules]; "
          "assert not heavy, heavy")
  run_python(["-c", code])
