#!/usr/bin/env python3
"""A training corpus of Python code from this machine's Python: its standard library (PSF) and
the installed distributions whose metadata declare a permissive license (MIT, BSD, Apache, PSF,
ISC, zlib, Unlicense, HPND; none naming GPL, LGPL, AGPL, MPL or EPL). Each distribution's .py
files (from its RECORD) are linked under OUT/<name>/..., at most --dist-max-mb of each, in
distribution-name order until --max-mb in all; the standard library goes to OUT/python-stdlib.
Writes a manifest (JSON: every distribution taken with its version, license and bytes, and
the totals) for models/<model>/README.md.

    python3 scripts/corpus.py --out DIR --manifest corpus.json [--max-mb 300] [--dist-max-mb 20]
"""
import argparse
import importlib.metadata as md
import json
import os
import re
import sys
import sysconfig

PERMISSIVE = re.compile(
    r"\b(MIT|BSD|Apache|PSF|Python Software Foundation|ISC|Zlib|Unlicense|HPND|"
    r"Historical Permission Notice)\b",
    re.I,
)
COPYLEFT = re.compile(r"\b(A?GPL|LGPL|GNU|MPL|Mozilla|EPL|Eclipse)\b", re.I)
# Single files larger than this are generated tables, not code anyone writes.
MAX_FILE_BYTES = 1 << 20


def license_of(dist):
    """The license a distribution declares (expression, field or classifiers), or None."""
    meta = dist.metadata
    names = []
    if meta.get("License-Expression"):
        names.append(meta["License-Expression"])
    field = (meta.get("License") or "").strip()
    # Some put the whole license text in the field: its first line names it.
    if field and field.upper() != "UNKNOWN":
        names.append(field.splitlines()[0][:120])
    names += [
        c.split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    text = "; ".join(names)
    if not text or COPYLEFT.search(text) or not PERMISSIVE.search(text):
        return None
    return text


def link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.lexists(dst):
        os.symlink(src, dst)


def python_files(root, skip=()):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--max-mb", type=float, default=300)
    ap.add_argument("--dist-max-mb", type=float, default=20)
    args = ap.parse_args()
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"error: {args.out} is not empty")
    budget = int(args.max_mb * 2**20)
    per_dist = int(args.dist_max_mb * 2**20)
    taken, total = [], 0

    stdlib = sysconfig.get_paths()["stdlib"]
    size = 0
    for path in python_files(stdlib, skip={"site-packages", "dist-packages", "__pycache__"}):
        n = os.path.getsize(path)
        if n > MAX_FILE_BYTES or total + n > budget:
            continue
        link(path, os.path.join(args.out, "python-stdlib", os.path.relpath(path, stdlib)))
        size += n
        total += n
    taken.append({"name": "python-stdlib", "version": sys.version.split()[0],
                  "license": "PSF-2.0", "bytes": size, "root": stdlib})

    skipped = []
    seen = set()
    for dist in sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = (dist.metadata["Name"] or "").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        lic = license_of(dist)
        if lic is None:
            skipped.append(name)
            continue
        size = 0
        for f in sorted(dist.files or [], key=str):
            if f.suffix != ".py" or "__pycache__" in f.parts:
                continue
            path = str(dist.locate_file(f))
            if not os.path.isfile(path):
                continue
            n = os.path.getsize(path)
            if n > MAX_FILE_BYTES or size + n > per_dist or total + n > budget:
                continue
            link(path, os.path.join(args.out, name, str(f)))
            size += n
            total += n
        if size:
            taken.append({"name": name, "version": dist.version, "license": lic, "bytes": size})
    manifest = {
        "python": sys.version.split()[0],
        "total_bytes": total,
        "max_mb": args.max_mb,
        "dist_max_mb": args.dist_max_mb,
        "taken": taken,
        "not_taken_license": skipped,
    }
    with open(args.manifest, "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"{len(taken)} sources, {total / 2**20:.1f} MiB of Python in {args.out} "
          f"({len(skipped)} distributions left out for their license)")


if __name__ == "__main__":
    main()
