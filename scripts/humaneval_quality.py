#!/usr/bin/env python3
"""Plausibility of a model's code (issue 19): greedy completions of the HumanEval prompts, and

- parses: the share of prompts whose prompt + completion parses with Python's `ast`;
- no loop: the share whose completion holds no loop, a piece of up to 24 tokens repeated back to
  back 3 or more times over at least 12 tokens (the "self._name, self._name, self._name" failure
  of small models; see `has_loop`),

each measured twice:

- the function (the main figures): the completion as HumanEval's own evaluation takes it, cut at
  the first of the Codex paper's stop sequences (`STOP`: what follows the function body, a new
  `def`, `class`, `if`, `print` or comment at the top level), then at its last complete line;
  loops counted over its words and symbols (the unit the self-test checks on the canonical
  solutions);
- raw: the whole completion cut at its last complete line, loops over its tokens. A model that
  finishes the function and starts another within the token budget fails this one when the
  budget ends inside the new function (SmolLM2-135M-Instruct: 56.1% raw, most failures of that
  kind).

A completion with no complete line counts as not parsing: it wrote nothing a reader can use.

Runs `layerskip bench --strategy ar` once over the prompts and reads its JSON (the texts and token
ids of the completions). Prints the figures, three completions, and writes them as JSON. The
prompts end before their trailing newline (as `bench` gives them: a byte-level BPE merges the
newline with the body's indentation, which the model then writes itself).

    python3 scripts/humaneval_quality.py --layerskip target/release/layerskip --model models/default \
        [--num-samples 164] [--max-new-tokens 96] [--device cpu] [--json out.json]

`--as-given` gives each prompt whole, trailing newline included, to `layerskip infer --strategy ar`
(one process per prompt), and `--as-given --heal` to `infer --heal` (token healing): what a user
who pastes a HumanEval prompt gets, with and without healing.
"""
import argparse
import ast
import collections
import json
import os
import re
import subprocess
import sys
import tempfile


# HumanEval's stop sequences (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def function_part(text):
    """The completion up to the first stop sequence, its newline kept (the body's last line is
    complete); all of it if there is none."""
    cut = min((i + 1 for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
    return text[:cut]


def words(text):
    """Words, single symbols and newlines: the unit loops are counted in over text."""
    return re.findall(r"\w+|[^\w\s]|\n", text)


def cut_at_last_line(text):
    """The completion up to and including its last newline (nothing if it has none)."""
    end = text.rfind("\n")
    return text[: end + 1] if end >= 0 else ""


def parses(source):
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def has_loop(tokens, min_len=12, min_repeats=3, max_period=24):
    """Whether the tokens hold a loop: a span of at least `min_len` tokens that repeats a piece of
    at most `max_period` tokens back to back, at least `min_repeats` times. (None of HumanEval's
    164 canonical solutions has one, counted over words and symbols; counting every 4-gram seen
    3 times instead flagged 26 of them.)"""
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            if run + p >= max(min_len, min_repeats * p):
                return True
    return False


def humaneval_problems(path):
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return {p["task_id"]: p for p in (json.loads(line) for line in f if line.strip())}


def self_test(data):
    """The measures against references they must agree with: HumanEval's canonical solutions
    all parse after their prompts and hold no loop (over words and symbols); a completion cut
    inside a line parses only up to that line; loops of every period are found."""
    problems = list(humaneval_problems(data).values())
    assert len(problems) == 164, len(problems)
    for p in problems:
        assert parses(p["prompt"] + p["canonical_solution"]), p["task_id"]
        assert not has_loop(words(p["canonical_solution"])), p["task_id"]
        assert function_part(p["canonical_solution"]) == p["canonical_solution"], p["task_id"]
    assert cut_at_last_line("    return x\n    if y") == "    return x\n"
    assert cut_at_last_line("    return x") == ""
    body = "\n    return x\n"
    for stop in STOP:
        assert function_part(body + stop[1:] + " rest\n") == body
        assert function_part(body + stop[1:]) == body
    assert function_part(body + "    if y:\n") == body + "    if y:\n"  # indented: the body's
    assert words("a(b, 12)\n") == ["a", "(", "b", ",", "12", ")", "\n"]
    assert not parses("def f(:\n")
    assert has_loop([1, 2, 3, 4] * 3) and not has_loop([1, 2, 3, 4] * 2 + [5, 6, 7, 8])
    assert has_loop([7] * 12) and not has_loop([7] * 11)
    assert has_loop([9, 9] + list(range(20)) * 3) and not has_loop(list(range(30)) * 2)
    print("self-test passed: 164 canonical solutions parse, hold no loop, and are whole functions")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-test", action="store_true",
                    help="check the measures against HumanEval's canonical solutions and exit")
    ap.add_argument("--layerskip", help="the layerskip binary")
    ap.add_argument("--model")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "datasets",
                                                   "humaneval", "HumanEval.jsonl.gz"),
                    help="HumanEval.jsonl(.gz) (default: the one vendored in datasets/)")
    ap.add_argument("--num-samples", type=int, default=164)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the figures and every completion here")
    ap.add_argument("--as-given", action="store_true",
                    help="prompts with their trailing newline, through `infer` one at a time")
    ap.add_argument("--heal", action="store_true", help="with --as-given: `infer --heal`")
    args = ap.parse_args()
    if args.self_test:
        return self_test(args.data)
    if not (args.layerskip and args.model):
        ap.error("--layerskip and --model are required")

    if args.heal and not args.as_given:
        ap.error("--heal needs --as-given")
    if args.as_given:
        return report(args, infer_each(args), whole=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [args.layerskip, "bench", "--model", args.model, "--dataset", "humaneval",
               "--num-samples", str(args.num_samples), "--max-new-tokens", str(args.max_new_tokens),
               "--strategy", "ar", "--repeats", "1", "--warmup", "0", "--device", args.device,
               "--data", args.data, "--json", out]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{run.stderr}")
        bench = json.load(open(out))
    return report(args, bench["outputs"][0][1], whole=False)


def infer_each(args):
    """`layerskip infer --json` on each prompt as HumanEval gives it (outputs shaped as bench's)."""
    problems = list(humaneval_problems(args.data).values())[: args.num_samples]
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in problems:
            path = os.path.join(tmp, "prompt.txt")
            with open(path, "w") as f:
                f.write(p["prompt"])
            cmd = [args.layerskip, "infer", "--model", args.model, "--prompt-file", path,
                   "--max-new-tokens", str(args.max_new_tokens), "--strategy", "ar", "--json",
                   "--no-warm-up", "--device", args.device] + (["--heal"] if args.heal else [])
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"error: {' '.join(cmd)} failed:\n{run.stderr}")
            out = json.loads(run.stdout)
            outputs.append({"id": p["task_id"], "text": out["text"], "tokens": out["tokens"]})
    return outputs


def report(args, outputs, whole):
    """The figures over `outputs` (completions of the prompts, whole or cut before their
    trailing newline), printed and written as JSON."""
    # `bench` cuts each prompt before its trailing newline (see layerskip-eval's load_humaneval):
    # the completion starts with the newline and the body's indentation.
    prompts = {k: p["prompt"] if whole else p["prompt"].rstrip()
               for k, p in humaneval_problems(args.data).items()}
    rows = []
    for o in outputs:
        prompt = prompts[o["id"]]
        function = cut_at_last_line(function_part(o["text"]))
        cut = cut_at_last_line(o["text"])
        rows.append({
            "id": o["id"],
            "completion": o["text"],
            "function": function,
            "parses": bool(function.strip()) and parses(prompt + function),
            "loop": has_loop(words(function)),
            "cut": cut,
            "raw_parses": bool(cut.strip()) and parses(prompt + cut),
            "raw_loop": has_loop(o["tokens"]),
        })
    n = len(rows)
    share = lambda key, value=True: sum(r[key] == value for r in rows) / n
    summary = {
        "model": args.model,
        "prompts": ("as given, healed" if args.heal else "as given") if whole
        else "cut before the trailing newline",
        "samples": n,
        "max_new_tokens": args.max_new_tokens,
        "parses": share("parses"),
        "no_loop": share("loop", False),
        "no_complete_line": sum(not r["function"].strip() for r in rows) / n,
        "raw_parses": share("raw_parses"),
        "raw_no_loop": share("raw_loop", False),
    }
    print(f"{args.model}: {n} HumanEval prompts ({summary['prompts']}), greedy "
          f"{args.max_new_tokens} tokens:\n"
          f"  the function (cut at HumanEval's stop sequences, then at its last line): "
          f"{100 * summary['parses']:.1f}% parse, {100 * summary['no_loop']:.1f}% without a loop, "
          f"{100 * summary['no_complete_line']:.1f}% without a complete line\n"
          f"  raw (the whole completion cut at its last line): "
          f"{100 * summary['raw_parses']:.1f}% parse, "
          f"{100 * summary['raw_no_loop']:.1f}% without a loop")
    for r in rows[:3]:
        print(f"--- {r['id']} (parses: {r['parses']}, loop: {r['loop']})\n{r['completion']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "completions": rows}, f, indent=1)


if __name__ == "__main__":
    main()
