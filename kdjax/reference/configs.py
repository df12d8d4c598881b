"""The experiment configs under a directory: each file's first docstring line and the
variants (`FILE:VARIANT`) its docstring's commands use."""

import ast
import dataclasses
import os
import re
from typing import List, Tuple


@dataclasses.dataclass(frozen=True)
class ConfigRow:
  path: str  # 'configs/quickstart.py', relative to the directory's parent.
  summary: str
  variants: Tuple[str, ...]  # As written after ':' in the docstring's commands.


def _docstring(path: str) -> str:
  with open(path) as f:
    try:
      return ast.get_docstring(ast.parse(f.read())) or ""
    except SyntaxError:
      return ""


def list_configs(directory: str) -> List[ConfigRow]:
  """Every `get_config()` file under `directory` (sub-directories included; `common.py`,
  `__init__.py` and other files without `get_config` left out), sorted by path."""
  rows = []
  parent = os.path.dirname(os.path.abspath(directory))
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if not name.endswith(".py") or name.startswith("_"):
        continue
      with open(path) as f:
        if "def get_config" not in f.read():
          continue
      relative = os.path.relpath(path, parent)
      doc = _docstring(path)
      summary = " ".join(doc.split("\n\n")[0].split())
      pattern = re.escape(relative) + r":([^\s`'\"]+)"
      variants = tuple(dict.fromkeys(re.findall(pattern, doc)))
      rows.append(ConfigRow(relative, summary, variants))
  return sorted(rows, key=lambda r: r.path)
