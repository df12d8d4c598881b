"""Trace-time argument checks shared by the loss functions.

Every check runs on static information only (shapes, dtypes, Python-number
hyper-parameters) so it costs nothing inside `jax.jit`. The one exception is the
label / index range check, which only runs when the values are concrete (not
traced), i.e. when a loss is called eagerly.

Messages start with the public function's name so that a failing call inside a
larger training step still says which loss rejected its arguments.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from kdjax import validation


def as_array(name: str, arg_name: str, x: Any) -> jax.Array:
  """Returns `x` as an array (tracers and arrays pass through)."""
  if isinstance(x, (jax.Array, jax.core.Tracer)):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"{name}: {arg_name} must be an array, got {type(x).__name__}") from e


def check_logits(name: str, arg_name: str, x: Any, *, min_classes: int = 1
                 ) -> jax.Array:
  """Checks that `x` is a floating array of rank >= 1 with enough classes."""
  x = as_array(name, arg_name, x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name}: {arg_name} must have a floating dtype (logits), got dtype "
        f"{x.dtype} with shape {tuple(x.shape)}; cast with .astype(jnp.float32)")
  if x.ndim < 1:
    raise ValueError(
        f"{name}: {arg_name} must have rank >= 1 with the class axis last "
        f"([..., C]), got shape {tuple(x.shape)}")
  if x.shape[-1] < min_classes:
    raise ValueError(
        f"{name}: {arg_name} needs at least {min_classes} classes on the last "
        f"axis, got shape {tuple(x.shape)}")
  return x


def check_same_shape(name: str, student: jax.Array, teacher: jax.Array,
                     student_name: str = "student_logits",
                     teacher_name: str = "teacher_logits") -> None:
  """Checks that student and teacher logits have identical shapes."""
  s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
  if s_shape == t_shape:
    return
  if len(s_shape) == len(t_shape) and s_shape[:-1] == t_shape[:-1]:
    raise ValueError(
        f"{name}: {student_name} shape {s_shape} and {teacher_name} shape "
        f"{t_shape} differ: vocabulary/class sizes differ: student "
        f"V={s_shape[-1]} teacher V={t_shape[-1]}")
  raise ValueError(
      f"{name}: {student_name} shape {s_shape} and {teacher_name} shape "
      f"{t_shape} must be equal")


def check_where(name: str, where: Any, expected_shape: Sequence[int]
                ) -> Optional[jax.Array]:
  """Checks the mask shape and returns it as a boolean array (or None)."""
  if where is None:
    return None
  where = as_array(name, "where", where)
  expected_shape = tuple(expected_shape)
  if tuple(where.shape) != expected_shape:
    raise ValueError(
        f"{name}: where must have shape {expected_shape} (the logits shape "
        f"without the class axis), got shape {tuple(where.shape)}")
  if where.dtype == jnp.bool_:
    return where
  return where != 0


def is_concrete(x: Any) -> bool:
  """True when `x` holds values we can read now (not a tracer)."""
  if isinstance(x, jax.core.Tracer):
    return False
  if isinstance(x, jax.Array) and not getattr(x, "is_fully_addressable", True):
    return False
  return True


def check_int_range(name: str, arg_name: str, x: jax.Array, upper: int,
                    where: Optional[jax.Array]) -> None:
  """Checks 0 <= x < upper where `where` is true, if values are concrete."""
  if not is_concrete(x) or (where is not None and not is_concrete(where)):
    return
  if x.size == 0:
    return
  # Host copies (numpy arrays, via jax): no per-shape compilation in eager use.
  values = jax.device_get(x)
  if where is not None:
    mask = jax.device_get(where)
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    valid = (values == values) & mask  # the mask broadcast to values.shape
    if not valid.any():
      return
    values = values[valid]
  lo, hi = int(values.min()), int(values.max())
  if lo < 0 or hi >= upper:
    raise ValueError(
        f"{name}: {arg_name} must lie in [0, {upper}) (the number of classes) "
        f"at unmasked positions, got values in [{lo}, {hi}] with shape "
        f"{tuple(x.shape)}")


def check_labels(name: str, labels: Any, batch_shape: Sequence[int],
                 num_classes: int, where: Optional[jax.Array]) -> jax.Array:
  """Checks integer class labels of shape `batch_shape` with values in range."""
  labels = as_array(name, "labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f"{name}: labels must have an integer dtype, got dtype {labels.dtype} "
        f"with shape {tuple(labels.shape)}")
  batch_shape = tuple(batch_shape)
  if tuple(labels.shape) != batch_shape:
    raise ValueError(
        f"{name}: labels must have shape {batch_shape} (the logits shape "
        f"without the class axis), got shape {tuple(labels.shape)}")
  check_int_range(name, "labels", labels, num_classes, where)
  return labels


def is_python_number(x: Any) -> bool:
  return validation.is_number(x)


def check_positive(name: str, arg_name: str, value: Any) -> None:
  """Checks value > 0 when it is a Python number (traced values pass)."""
  if is_python_number(value) and not validation.obeys(value, validation.POSITIVE):
    raise ValueError(f"{name}: {arg_name} must be > 0, got {value}")


def check_interval(name: str, arg_name: str, value: Any, low: float,
                   high: float, *, high_inclusive: bool = True) -> None:
  """Checks low <= value <= high (or < high) when value is a Python number."""
  if not is_python_number(value):
    return
  if not validation.obeys(value, validation.interval(low, high,
                                                     high_inclusive=high_inclusive)):
    bracket = "]" if high_inclusive else ")"
    raise ValueError(
        f"{name}: {arg_name} must lie in [{low}, {high}{bracket}, got {value}")


def broadcast_hyper(name: str, arg_name: str, value: Any, size: int
                    ) -> Tuple[Any, ...]:
  """Turns a number or a length-`size` sequence into a `size`-tuple."""
  if is_python_number(value):
    return (value,) * size
  if isinstance(value, (jax.Array, jax.core.Tracer)) and value.ndim == 0:
    return (value,) * size
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    if tuple(value.shape) != (size,):
      raise ValueError(
          f"{name}: {arg_name} must be a number or have shape ({size},) (one "
          f"per teacher), got shape {tuple(value.shape)}")
    return tuple(value[i] for i in range(size))
  try:
    values = tuple(value)
  except TypeError as e:
    raise TypeError(
        f"{name}: {arg_name} must be a number or a sequence of {size} numbers, "
        f"got {type(value).__name__}") from e
  if len(values) != size:
    raise ValueError(
        f"{name}: {arg_name} must have one entry per teacher ({size}), got "
        f"{len(values)} entries")
  return values


def upcast(x: jax.Array) -> jax.Array:
  """Casts bf16/f16 to float32; float32 and float64 are kept as they are."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_features(name: str, arg_name: str, x: Any, *, min_rank: int = 2) -> jax.Array:
  """Checks a floating `[B, ...]` feature array of rank >= `min_rank`."""
  x = as_array(name, arg_name, x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name}: {arg_name} must have a floating dtype, got dtype {x.dtype} with shape "
        f"{tuple(x.shape)}")
  if x.ndim < min_rank:
    layout = {2: "[B, D]", 3: "[B, H, W, C] or [B, T, D]"}.get(min_rank, f"rank {min_rank}")
    raise ValueError(f"{name}: {arg_name} must be at least {layout}, got shape "
                     f"{tuple(x.shape)}")
  return x


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """The l2 norm along `axis`, with a zero (not NaN) gradient at the zero vector."""
  squared = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` as PyTorch's `F.normalize`: the zero vector stays zero."""
  return x / jnp.maximum(safe_norm(x, axis=axis, keepdims=True), eps)
