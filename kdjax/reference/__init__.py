"""The reference, generated from the code so that it cannot drift from it.

The same functions print `python -m experiments.main --list=methods|models|datasets|configs`,
the field meanings of `--help --config=...`, and write `docs/methods.md`, `docs/models.md` and
README.md's capability table (`python -m kdjax.reference` rewrites them;
`tests/reference/test_reference.py` fails when the committed pages differ). Nothing here trains
or compiles: model sizes and taps come from `jax.eval_shape`.
"""

from kdjax.reference.config_help import describe_config
from kdjax.reference.configs import list_configs
from kdjax.reference.datasets import dataset_rows
from kdjax.reference.methods import field_help, method_rows
from kdjax.reference.models import model_rows
from kdjax.reference.pages import LIST_KINDS, generated_pages, listing

__all__ = ["LIST_KINDS", "dataset_rows", "describe_config", "field_help", "generated_pages",
           "list_configs", "listing", "method_rows", "model_rows"]
