"""kdjax: knowledge distillation in JAX/Flax.

Import what you need from the subpackages; importing `kdjax` itself pulls in nothing heavy:

    from kdjax import losses          # pure jax.numpy loss functions
    from kdjax import models          # Flax modules returning Output(logits, features)
    kdjax.load_run('runs/quickstart', run='kd')   # a trained student (imports Flax, orbax)
"""

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import kdjax` stays free of Flax, orbax and TFDS.
_LAZY = {"load_run": "kdjax.train.load", "LoadedRun": "kdjax.train.load"}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'kdjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
