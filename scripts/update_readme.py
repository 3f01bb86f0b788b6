#!/usr/bin/env python3
"""Paste generated tables into README.md between its markers, so its figures come from runs.

    python scripts/update_readme.py BENCH-TABLES-INTEL bench_out/acceptance.md bench_out/tables.md  (or -AMD)
    python scripts/update_readme.py DEMO-TABLE bench_out/demo.md

Several files are pasted one after the other.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(marker: str, *paths: str) -> int:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(f.read().strip())
    body = "\n\n".join(parts)
    pat = re.compile(rf"(<!-- {marker}:BEGIN -->\n).*?(<!-- {marker}:END -->)", re.S)
    if not pat.search(text):
        print(f"README.md has no <!-- {marker}:BEGIN/END --> markers", file=sys.stderr)
        return 1
    text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    with open(readme, "w") as f:
        f.write(text)
    print(f"README.md: {marker} updated from {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
