"""kdjax.methods.register: a method defined outside kdjax runs through configs and the step."""

import jax.numpy as jnp
import ml_collections
import pytest

from configs import quickstart
from kdjax import methods
from kdjax.methods import base, registry
from kdjax.models.output import Output
from kdjax.train.validate import validate_config


class HalfCE(base.Method):
  name = "half_ce_for_test"
  teacher_needs = base.TeacherNeeds(kind="none")
  positive_fields = ("scale",)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(scale=0.5))

  def loss(self, params, state, batch, ops):
    ce = base.cross_entropy(batch, ops)
    return self.config.scale * ce, {"ce": ce}, state


@pytest.fixture
def registered():
  yield methods.register(HalfCE)
  registry.METHODS.pop(HalfCE.name, None)


def test_registered_method_is_built_from_a_config_and_validated(registered):
  assert registered is HalfCE and methods.get_method_class(HalfCE.name) is HalfCE
  config = quickstart.get_config("smoke")
  config.suite = f"teacher,{HalfCE.name}"
  config.method = HalfCE.name
  config[HalfCE.name] = HalfCE.default_config()
  validate_config(config, num_devices=1)  # Knows the name as a method and a suite row.
  method = methods.build_method(config)
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  batch = base.Batch(student=Output(logits, {}), teacher=None, labels=jnp.array([0, 0]),
                     where=jnp.array([True, True]), step=jnp.array(0))
  loss, metrics, _ = method.loss({}, {}, batch, base.single_device_ops())
  # CE by hand: -log softmax = log(1 + e^-2) and log(1 + e^1); the loss is half their mean.
  expected_ce = (jnp.log1p(jnp.exp(-2.0)) + jnp.log1p(jnp.exp(1.0))) / 2
  assert float(metrics["ce"]) == pytest.approx(float(expected_ce), rel=1e-6)
  assert float(loss) == pytest.approx(0.5 * float(expected_ce), rel=1e-6)
  config[HalfCE.name].scale = -1.0
  with pytest.raises(ValueError, match=f"config.{HalfCE.name}.scale must be a positive"):
    validate_config(config, num_devices=1)


def test_register_refuses_mistakes(registered):
  with pytest.raises(TypeError, match="not a subclass of kdjax.methods.base.Method"):
    methods.register(object)
  with pytest.raises(ValueError, match="one of kdjax's methods"):
    methods.register(type("MyKD", (HalfCE,), {"name": "kd"}))
  with pytest.raises(ValueError, match="must be a Python identifier"):
    methods.register(type("Bad", (HalfCE,), {"name": "my-method"}))
  with pytest.raises(TypeError, match="does not define loss"):
    methods.register(type("NoLoss", (base.Method,), {"name": "no_loss"}))
  other = type("Other", (HalfCE,), {})
  with pytest.raises(ValueError, match="already registered .*replace=True"):
    methods.register(other)
  assert methods.register(HalfCE) is HalfCE  # The same class again: a no-op.
  assert methods.register(other, replace=True) is other
  assert methods.get_method_class(HalfCE.name) is other
