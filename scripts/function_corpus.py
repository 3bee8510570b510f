#!/usr/bin/env python3
"""Function-level fine-tuning data in HumanEval's shape from a corpus of Python files (the one
`scripts/corpus.py` builds): every function or method with a docstring, 2 to 30 lines of body
after the docstring and at most 30 lines up to its end, no tabs, under 3000 characters,
dedented to the top level and parsing alone, as a JSONL line {"prompt": decorators + signature
+ docstring (no trailing newline), "response": "\\n" + body + "\\n"}. `layerskip train` computes
no loss on the prompt and ends each document with EOS, so the model learns to write a body from a
docstring and to stop after it. Deterministic: sorted paths, then a seeded shuffle.

    python3 scripts/function_corpus.py CORPUS_DIR OUT.jsonl
"""
import ast
import json
import os
import random
import sys
import textwrap


def functions(src):
    """(prompt, response) of each qualifying function of a module's source."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return
    lines = src.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not ast.get_docstring(node, clean=False) or len(node.body) < 2:
            continue
        first = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
        doc_end = node.body[0].end_lineno
        if not 2 <= node.end_lineno - doc_end <= 30 or doc_end - first > 30:
            continue
        text = textwrap.dedent("\n".join(lines[first:node.end_lineno]))
        if "\t" in text or len(text) > 3000:
            continue
        try:
            ast.parse(text)
        except SyntaxError:
            continue
        own = text.splitlines()
        k = doc_end - first
        yield "\n".join(own[:k]), "\n" + "\n".join(own[k:]) + "\n"


def main():
    root, out = sys.argv[1], sys.argv[2]
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                try:
                    src = open(os.path.join(dirpath, name), encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                rows.extend(functions(src))
    random.Random(0).shuffle(rows)
    with open(out, "w") as f:
        for prompt, response in rows:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    chars = sum(len(p) + len(r) for p, r in rows)
    print(f"{len(rows)} functions, {chars / 1e6:.1f} M characters -> {out}")


if __name__ == "__main__":
    main()
