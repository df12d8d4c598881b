"""`python -m kdjax.reference [--root=.]`: rewrites docs/methods.md, docs/models.md and
README.md's capability table from the code; `--check` only says which differ (status 1)."""

import argparse
import os
import sys

from kdjax.reference import pages


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--root", default=".", help="the repository root (default: .)")
  parser.add_argument("--check", action="store_true", help="compare only; write nothing")
  args = parser.parse_args(argv)
  stale = []
  for page, text in pages.generated_pages(args.root).items():
    path = os.path.join(args.root, page)
    current = open(path).read() if os.path.exists(path) else None
    if current == text:
      continue
    stale.append(page)
    if not args.check:
      with open(path, "w") as f:
        f.write(text)
  verb = "differ from the code" if args.check else "rewritten"
  print(f"{', '.join(stale)} {verb}" if stale else "reference pages up to date")
  return 1 if args.check and stale else 0


if __name__ == "__main__":
  sys.exit(main())
