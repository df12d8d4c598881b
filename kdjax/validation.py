"""The one set of value rules behind every check of kdjax: losses, methods and configs.

A hyper-parameter is a number when it is a real Python number and not a bool (`True` is not
a temperature). Each layer words its own message (a loss names the function and argument, a
method or config the `config.<field>`), but what counts as positive, non-negative, finite,
an integer or inside an interval is decided here, once. Pure Python: `kdjax.losses` imports
it without pulling in anything but jax.
"""

import math
import numbers
from typing import Any, Callable, NamedTuple


class ConfigError(ValueError):
  """A config field (or method hyper-parameter) with a value that is not allowed."""


def is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Rule(NamedTuple):
  """`test(value)` is True when a number obeys the rule; `text` completes "must be ..."."""
  test: Callable[[Any], bool]
  text: str


POSITIVE = Rule(lambda v: v > 0, "a positive number")
NON_NEGATIVE = Rule(lambda v: v >= 0, "a number >= 0")
FINITE = Rule(math.isfinite, "a finite number")
# bool is an Integral in Python; True is not a step count.
_is_int = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
POSITIVE_INT = Rule(lambda v: _is_int(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0")


def interval(low: float, high: float, *, low_inclusive: bool = True,
             high_inclusive: bool = True) -> Rule:
  text = (("[" if low_inclusive else "(") + f"{low}, {high}" + ("]" if high_inclusive else ")"))
  return Rule(lambda v: (low <= v if low_inclusive else low < v) and
              (v <= high if high_inclusive else v < high), f"a number in {text}")


def obeys(value: Any, rule: Rule) -> bool:
  """True for a number that obeys `rule` (NaN obeys nothing)."""
  return is_number(value) and value == value and bool(rule.test(value))


def require(value: Any, rule: Rule, field: str) -> None:
  """Raises ConfigError "`field` must be <rule>, got <value>." unless `value` obeys `rule`."""
  if not obeys(value, rule):
    raise ConfigError(f"{field} must be {rule.text}, got {value!r}.")


def one_of(field: str, value: Any, allowed) -> None:
  """Raises ConfigError naming the valid values (and the closest one) unless allowed."""
  from kdjax.names import did_you_mean  # pylint: disable=g-import-not-at-top
  allowed = sorted(allowed)
  if value not in allowed:
    raise ConfigError(f"{field}={value!r} is not valid{did_you_mean(value, allowed)}; "
                      f"valid values: {', '.join(map(str, allowed))}.")
