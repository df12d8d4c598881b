"""Suggestions for mistyped names (fields, methods, models, runs, files)."""

import difflib
from typing import Iterable


def did_you_mean(name, candidates: Iterable) -> str:
  """' (did you mean 'temperature'?)' for a near miss of one of `candidates`, else ''."""
  close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""
