#!/usr/bin/env python3
"""Prints the executable that a cargo build made for target NAME (of kind KIND, e.g. test or
bin, when given), from the build's `--message-format=json` messages on stdin; the last one if
several, nothing if none.

    cargo test --no-run --message-format=json ... | python3 scripts/cargo_exe.py NAME [KIND]
"""
import json
import sys

name = sys.argv[1]
kind = sys.argv[2] if len(sys.argv) > 2 else None
found = None
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("name") == name:
        if kind is None or kind in t.get("kind", []):
            found = m["executable"]
if found:
    print(found)
