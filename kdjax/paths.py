"""User-typed paths, resolved once: relative to the current directory, `~` expanded.

Orbax refuses relative checkpoint paths and a shell leaves `~` unexpanded inside
`--workdir=~/runs`, so every path a user gives (command line, config, notebook call) goes
through `resolve` where it enters kdjax.
"""

import os
from typing import Optional


def resolve(path: Optional[str]) -> Optional[str]:
  """`~/x` -> `/home/me/x`, `runs/x` -> `/cwd/runs/x`; None and '' are returned as given."""
  if not path:
    return path
  return os.path.abspath(os.path.expanduser(os.fspath(path)))
