"""The 'model'-axis rules on the real parameter trees of `lm_teacher`, `lm_tiny` and
`vit_tiny` (shapes from `jax.eval_shape`, nothing computed), and `config.mesh` parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import models
from kdjax.train import parallel as parallel_lib
from kdjax.train import sharding_rules


def _specs(model_name, num_classes, sample, axis_size):
  module = models.get_model(model_name, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.key(0), sample))
  specs = sharding_rules.partition_specs(shapes, axis_size)
  flat_specs = dict((sharding_rules.path_name(path), spec) for path, spec in
                    jax.tree_util.tree_flatten_with_path(
                        specs, is_leaf=lambda x: isinstance(x, P))[0])
  flat_shapes = {sharding_rules.path_name(path): leaf.shape
                 for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  return flat_specs, flat_shapes


def _sharded_fraction(specs, shapes, axis_size):
  """Bytes per device over total bytes (float32 everywhere)."""
  total = sum(np.prod(s) for s in shapes.values())
  per_device = sum(np.prod(shapes[k]) / (axis_size if "model" in tuple(specs[k]) else 1)
                   for k in shapes)
  return per_device / total


def test_lm_teacher_column_row_and_embedding_rules():
  specs, shapes = _specs("lm_teacher", 259, jnp.zeros((2, 8), jnp.int32), 4)
  block = "params/blocks_3/"
  for name in ("attention/query", "attention/key", "attention/value", "gate", "up"):
    assert specs[block + name + "/kernel"] == P(None, "model"), name
  for name in ("attention/out", "down"):
    assert specs[block + name + "/kernel"] == P("model", None), name
  # 259 byte tokens do not divide by 4: the embedding [259, 256] is split on the hidden axis.
  assert shapes["params/embed/embedding"] == (259, 256)
  assert specs["params/embed/embedding"] == P(None, "model")
  for name in ("attention_norm/scale", "mlp_norm/scale"):
    assert specs[block + name] == P(), name
  assert specs["params/final_norm/scale"] == P()
  # Every matrix is split, only the norm scales (0.3% of the bytes) are replicated.
  assert 0.25 < _sharded_fraction(specs, shapes, 4) < 0.26


def test_embedding_on_vocabulary_when_it_divides():
  specs, _ = _specs("lm_tiny", 256, jnp.zeros((2, 8), jnp.int32), 4)
  assert specs["params/embed/embedding"] == P("model", None)


def test_vit_rules_and_bias_placement():
  specs, shapes = _specs("vit_tiny", 100, jnp.zeros((2, 32, 32, 3)), 4)
  block = "params/block5/"
  assert specs[block + "attn/qkv/kernel"] == P(None, "model")
  assert specs[block + "attn/qkv/bias"] == P("model")  # Column-parallel bias: split.
  assert specs[block + "attn/proj/kernel"] == P("model", None)
  assert specs[block + "attn/proj/bias"] == P()  # Row-parallel bias: added once, replicated.
  assert specs[block + "fc1/kernel"] == P(None, "model")
  assert specs[block + "fc1/bias"] == P("model")
  assert specs[block + "fc2/kernel"] == P("model", None)
  assert specs[block + "fc2/bias"] == P()
  assert specs["params/head/kernel"] == P(None, "model")
  for name in ("patch_embed/kernel", "pos_embed", "cls_token", "norm/scale",
               block + "norm1/scale"):
    name = name if name.startswith("params/") else "params/" + name
    assert specs[name] == P(), name
  assert _sharded_fraction(specs, shapes, 4) < 0.3


def test_indivisible_dimension_falls_back_to_replicated():
  # lm_tiny: D=32, mlp 64; with a 'model' axis of 3 nothing divides.
  specs, _ = _specs("lm_tiny", 259, jnp.zeros((2, 8), jnp.int32), 3)
  assert all(spec == P() for spec in specs.values())
  assert sharding_rules.spec_for("x/attention/query/kernel", (6, 9), 3) == P(None, "model")
  assert sharding_rules.spec_for("x/attention/query/kernel", (6, 10), 3) == P()


def test_specs_name_trailing_dimensions_of_stacked_teachers():
  assert sharding_rules.spec_for("params/blocks_0/down/kernel", (3, 64, 32), 4) == P(
      None, "model", None)
  assert sharding_rules.spec_for("opt_state/0/mu/student/blocks_0/up/kernel", (32, 64), 4) == P(
      None, "model")


@pytest.mark.parametrize("kind,mesh,expected", [
    ("jit_2d", "data=2,model=4", (2, 4)),
    ("jit_2d_fsdp", "model=2", (4, 2)),
    ("jit_2d", " data = 1 , model = 8 ", (1, 8)),
    ("jit", "", (8, 1)),
])
def test_mesh_shape(kind, mesh, expected):
  assert parallel_lib.mesh_shape(kind, mesh, 8) == expected


@pytest.mark.parametrize("kind,mesh,message", [
    ("jit_2d", "data=2,model=2", r"config.mesh='data=2,model=2' has 2 x 2 = 4 devices but there "
     r"are 8"),
    ("jit_2d", "", r"config.parallel='jit_2d' needs config.mesh"),
    ("jit_2d", "data=2,modle=4", r"config.mesh='data=2,modle=4' must read"),
    ("jit_2d", "data=8", r"must give the 'model' axis size"),
    ("jit_2d", "model=0", r"must read"),
    ("jit_2d", "model=3", r"has 2 x 3 = 6 devices"),
    ("jit", "data=2,model=4", r"config.mesh='data=2,model=4' applies only to config.parallel"),
])
def test_mesh_shape_errors(kind, mesh, message):
  with pytest.raises(ValueError, match=message) as error:
    parallel_lib.mesh_shape(kind, mesh, 8)
  assert "\n" not in str(error.value)
