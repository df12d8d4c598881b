"""The generated reference (kdjax.reference): the committed pages equal what the code generates,
every method declares its family and the meaning of every hyper-parameter, and the command
line prints it. Regenerate the pages with `python -m kdjax.reference`."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from kdjax.methods import base, registry
from kdjax.reference import configs, methods, models, pages

REGENERATE = f"run `{pages.REGENERATE}` at the repository root and commit the result"


def _committed(page):
  with open(os.path.join(REPO, page)) as f:
    return f.read()


@pytest.mark.parametrize("page", [pages.METHODS_PAGE, pages.README])
def test_committed_page_equals_the_generated_one(page):
  generated = pages.generated_pages(REPO, [page])[page]
  assert _committed(page) == generated, f"{page} differs from the code: {REGENERATE}."


def test_models_page_lists_every_builtin_model_with_its_input_kind():
  """The cheap half of docs/models.md (names, input kinds); the slow test below traces every
  model for the parameter counts and taps."""
  from kdjax.models import registry as model_registry
  rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", _committed(pages.MODELS_PAGE), flags=re.M)
  expected = [(n, model_registry.model_input_kind(n)) for n in model_registry.MODELS
              if n in model_registry.BUILT_IN]
  assert rows == expected, f"{pages.MODELS_PAGE} lists other models than the registry: {REGENERATE}."


@pytest.mark.slow
def test_models_page_equals_the_generated_one():
  page = pages.MODELS_PAGE
  assert _committed(page) == pages.generated_pages(REPO, [page])[page], \
      f"{page} differs from the code: {REGENERATE}."


def test_every_builtin_method_declares_family_and_every_field_meaning():
  for name in registry.BUILTIN_METHODS:
    cls = registry.METHODS[name]
    assert cls.family in base.FAMILIES, (name, cls.family)
    for field in cls.default_config().keys():
      assert methods.field_help(cls, field), f"config.{name}.{field} has no field_help"


def test_field_help_prefers_the_nearest_declaration():
  class Parent(base.Method):
    name = "parent_for_help"
    field_help = {"beta": "parent's beta"}
    def loss(self, params, state, batch, ops):  # pragma: no cover
      raise NotImplementedError

  class Child(Parent):
    field_help = {"temperature": "child's own temperature"}

  assert methods.field_help(Child, "beta") == "parent's beta"
  assert methods.field_help(Child, "temperature") == "child's own temperature"
  assert methods.field_help(Parent, "temperature") == base.COMMON_FIELD_HELP["temperature"]
  assert methods.field_help(Child, "no_such_field") is None


def test_compress_taps():
  names = ["stage1", "stage2", "stage3", "embedding", "stage1_preact", "stage2_preact",
           "block1", "block3"]
  assert models.compress_taps(names) == (
      "block1, block3, stage{1..3}, stage{1..2}_preact, embedding")


def test_configs_listing_has_subdirectories_and_variants():
  rows = {r.path: r for r in configs.list_configs(os.path.join(REPO, "configs"))}
  assert "configs/common.py" not in rows
  assert {"configs/cifar100/distill.py", "configs/cifar100/teacher.py",
          "configs/imagenet/resnet34_resnet18.py", "configs/quickstart.py"} <= set(rows)
  assert {"smoke", "seeds"} <= set(rows["configs/quickstart.py"].variants)
  assert rows["configs/quickstart.py"].summary.startswith("Quickstart")


def test_methods_listing_names_every_method_and_field():
  text = pages.listing("methods")
  for name, cls in registry.METHODS.items():
    assert re.search(rf"^{name}  \[", text, flags=re.M), name
    for field in cls.default_config().keys():
      assert f"    {name}.{field} " in text, (name, field)
  assert re.search(rf"^{len(registry.METHODS)} methods: ", text, flags=re.M)


def _main(*arguments):
  return subprocess.run([sys.executable, "-m", "experiments.main", *arguments], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_command_line_list_and_help():
  result = _main("--list=datasets")
  assert result.returncode == 0, result.stderr
  assert re.search(r"^mnist1d\s+signal1d\s+10\s", result.stdout, flags=re.M)
  wrong = _main("--list=losses")
  assert wrong.returncode == 2
  assert wrong.stderr.strip().splitlines() == [
      "Error: --list=losses: valid: methods, models, datasets, configs."]
  helped = _main("--config=configs/quickstart.py", "--help")
  assert helped.returncode == 0, helped.stderr
  assert re.search(r"--config\.parallel='jit'\s+how the step is spread over devices "
                   r"\[jit \| pmap \| jit_2d \| jit_2d_fsdp\]", helped.stdout)
  assert re.search(r"--config\.kd\.temperature=4\.0\s+softmax temperature", helped.stdout)
