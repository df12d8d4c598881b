"""Runs the examples in the kdjax.losses docstrings, so plain pytest checks them."""

import doctest
import importlib

import pytest

MODULES = [
    "kdjax.losses.logit",
    "kdjax.losses.contrastive",
    "kdjax.losses.feature",
    "kdjax.losses.relational",
    "kdjax.losses.chunked",
    "kdjax.losses.kernel",
    "kdjax.losses.variational",
    "kdjax.losses.norm_direction",
    "kdjax.losses.class_attention",
    "kdjax.losses.overhaul",
    "kdjax.losses.review",
    "kdjax.losses.attention",
    "kdjax.losses.self_distillation",
    "kdjax.losses.dino",
    "kdjax.losses.fused",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{module_name} has no doctest examples"
  assert result.failed == 0, f"{result.failed} doctest failures in {module_name}"


def test_every_public_function_has_an_example():
  from kdjax import losses
  for name in losses.__all__:
    doc = getattr(losses, name).__doc__ or ""
    assert ">>> from kdjax import losses" in doc, name
    assert "Returns:" in doc and "Args:" in doc, name
