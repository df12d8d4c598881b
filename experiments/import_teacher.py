r"""Converts a PyTorch teacher (`.pth` state_dict) into a kdjax checkpoint directory.

    python -m experiments.import_teacher --model=resnet32x4 --pth=resnet32x4_vanilla/ckpt.pth \
        --num_classes=100 --out=teachers/resnet32x4

then distil from it with `--config.teacher.model=resnet32x4 --config.teacher.checkpoint=
teachers/resnet32x4`. The `.pth` may be RepDistiller's `{'model': state_dict, ...}` (its
published teachers), `{'state_dict': ...}`, or a bare state_dict (torchvision); a
`module.` prefix (DataParallel) is dropped. The conversion checks that every tensor is used
once and has the shape the kdjax model expects; models that can be imported are those with a
`TORCH_IMPORT` converter (`kdjax.models.torch_import.importable_models()`). Paths may be
relative or start with '~'. Mistakes end in one line `Error: ...` and exit status 2.
"""

import os
import pickle

from absl import flags

from experiments import cli


def _define_flags():
  """Defined at start-up, not import, so that tests can import this module next to others that
  define flags of the same names (benchmarks.benchmark's --num_classes)."""
  flags.DEFINE_string("model", None, "kdjax model name of the teacher, e.g. resnet32x4.")
  flags.DEFINE_string("pth", None, "The PyTorch checkpoint (.pth) to convert.")
  flags.DEFINE_integer("num_classes", None, "Classes of the teacher's head.")
  flags.DEFINE_string("out", None, "New (or empty) directory to write the checkpoint to.")
  flags.DEFINE_bool(
      "trust_pickle", False, "Unpickle arbitrary objects in --pth (torch.load "
      "weights_only=False). Only for files you trust; needed for checkpoints that hold more "
      "than tensors and numbers.")
  flags.mark_flags_as_required(["model", "pth", "num_classes", "out"])


def load_state_dict(path: str, *, trust_pickle: bool = False) -> dict:
  """The `.pth` at `path` as {name: numpy array}; raises cli.UsageError for a bad file."""
  if not os.path.isfile(path):
    raise cli.UsageError(f"--pth={path}: no such file.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.UsageError("reading a .pth needs PyTorch; install it (pip install torch, the CPU "
                         "build is enough).") from None
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError as error:
    raise cli.UsageError(
        f"--pth={path}: torch.load(weights_only=True) refused it ({str(error)[:200]}); if you "
        "trust the file, add --trust_pickle.") from None
  except Exception as error:  # pylint: disable=broad-except  (zip, EOF, magic-number errors)
    raise cli.UsageError(f"--pth={path}: not a readable PyTorch checkpoint "
                         f"({type(error).__name__}: {str(error)[:200]}).") from None
  for wrapper in ("model", "state_dict"):  # RepDistiller saves {'model': ..., 'epoch': ...}.
    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
      loaded = loaded[wrapper]
      break
  if not isinstance(loaded, dict) or not all(hasattr(v, "numpy") for v in loaded.values()):
    raise cli.UsageError(f"--pth={path}: holds a {type(loaded).__name__}, not a state_dict "
                         "(a dict of tensors) or {'model': state_dict}.")
  return {(name[len("module."):] if name.startswith("module.") else name):
          value.detach().cpu().numpy() for name, value in loaded.items()}


def import_teacher(model: str, pth: str, *, num_classes: int, out: str,
                   trust_pickle: bool = False) -> str:
  """Converts `pth` and writes the kdjax checkpoint to `out`; returns the resolved `out`.

  Raises:
    cli.UsageError: unknown model, unreadable file, a state_dict of another architecture or
      class count, or an `out` that already holds files.
  """
  from kdjax import paths  # pylint: disable=g-import-not-at-top
  from kdjax.models import registry, torch_import  # pylint: disable=g-import-not-at-top
  from kdjax.names import did_you_mean  # pylint: disable=g-import-not-at-top
  from kdjax.train import checkpoint  # pylint: disable=g-import-not-at-top

  importable = sorted(torch_import.importable_models())
  if model not in importable:
    known = "" if model in registry.MODELS else " unknown model;"
    raise cli.UsageError(f"--model={model}:{known} no PyTorch import for it"
                         f"{did_you_mean(model, importable)}. Models with one: "
                         f"{', '.join(importable)}.")
  if num_classes < 1:
    raise cli.UsageError(f"--num_classes={num_classes}: must be at least 1.")
  pth, out = paths.resolve(pth), paths.resolve(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise cli.UsageError(f"--out={out}: exists and is not an empty directory; give a new one "
                         "(an import never overwrites).")
  state_dict = load_state_dict(pth, trust_pickle=trust_pickle)
  input_shape = (224, 224, 3) if registry.model_input_kind(model) == "image224" else (32, 32, 3)
  try:
    variables = torch_import.convert_state_dict(model, state_dict, num_classes=num_classes,
                                                input_shape=input_shape)
  except (KeyError, ValueError) as error:
    message = error.args[0] if error.args else str(error)
    raise cli.UsageError(f"--pth={pth} is not a {model} with --num_classes={num_classes}: "
                         f"{message}") from None
  try:
    return checkpoint.save_model_variables(out, variables, model_name=model)
  except checkpoint.CheckpointError as error:  # --out filled by someone else meanwhile.
    raise cli.UsageError(f"--out={out}: {error}") from None


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag=value.")
  from absl import logging  # pylint: disable=g-import-not-at-top

  from kdjax.train import files  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint step at INFO.
    logging.set_verbosity(logging.WARNING)
  model, num_classes = flags.FLAGS.model, flags.FLAGS.num_classes
  try:
    out = import_teacher(model, flags.FLAGS.pth, num_classes=num_classes, out=flags.FLAGS.out,
                         trust_pickle=flags.FLAGS.trust_pickle)
  except cli.UsageError as error:
    cli.fail(str(error))
  except files.DiskFullError as error:  # Not a usage mistake: status 1, as experiments.main.
    cli.fail(str(error), exit_code=1)
  print(f"Wrote {model} ({num_classes} classes) to {out}. Distil from it with "
        f"--config.teacher.model={model} --config.teacher.checkpoint={out}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, config_name=None)
