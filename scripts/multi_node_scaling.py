#!/usr/bin/env python3
"""Step time and tokens/s of `layerskip train` on 1, 2 and 4 processes of one machine.

Each process is one node of a multi-node run (`--nodes N --node-rank R --coordinator ...` on
loopback), so this exercises burn-collective's node-to-node all-reduce end to end. On one
machine it is a functional check, not a speed claim: the processes share the machine's cores.

The preset is the shipped model's recipe (configs/pretrain_from_scratch.toml) with held-out
evaluation and intermediate checkpoints off, so the time is the training steps' (plus one final
checkpoint). Prints a Markdown table and writes JSON.

    python3 scripts/multi_node_scaling.py [--binary target/release/layerskip] [--steps 6]
        [--nodes 1 2 4] [--json docs/results/multi-node-cpu.json]
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preset(steps, path):
    """The shipped recipe without evaluation or intermediate checkpoints."""
    text = open(os.path.join(ROOT, "configs", "pretrain_from_scratch.toml")).read()
    text = re.sub(r"(?m)^steps = \d+", f"steps = {steps}", text)
    text = re.sub(r"(?m)^save_every = \d+", "save_every = 0", text)
    text = re.sub(r"(?m)^eval_every = \d+", "eval_every = 0", text)
    text = re.sub(r"(?m)^eval_fraction = [0-9.]+", "eval_fraction = 0.0", text)
    with open(path, "w") as f:
        f.write(text)
    number = lambda key: int(re.search(rf"(?m)^{key} = (\d+)", text).group(1))
    return number("batch_size") * number("grad_accum") * number("seq_len")


def run(binary, config, nodes, work):
    out = os.path.join(work, f"run{nodes}")
    base = [binary, "train", "--config", config, "--out", out]
    coordinator = f"127.0.0.1:{free_port()}"
    procs, logs = [], []
    for rank in range(nodes):
        args = list(base)
        if nodes > 1:
            args += ["--nodes", str(nodes), "--node-rank", str(rank),
                     "--coordinator", coordinator,
                     "--node-address", f"127.0.0.1:{free_port()}"]
        log = open(os.path.join(work, f"run{nodes}-rank{rank}.log"), "w+")
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log))
        logs.append(log)
    codes = [p.wait() for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
    if any(codes):
        sys.exit(f"{nodes} nodes failed: {codes}\n" + "\n---\n".join(texts))
    m = re.search(r"saved \S+ \(([0-9.]+) s, ([0-9.]+) tokens/s\)", texts[0])
    if not m:
        sys.exit("no timing line in rank 0's log:\n" + texts[0])
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "layerskip"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="layerskip-scaling-")
    try:
        config = os.path.join(work, "preset.toml")
        tokens_per_step = preset(args.steps, config)
        rows = []
        for nodes in args.nodes:
            seconds, tokens_per_s = run(args.binary, config, nodes, work)
            rows.append({
                "processes": nodes,
                "steps": args.steps,
                "seconds": seconds,
                # The log rounds seconds; tokens/s holds the precision.
                "step_s": tokens_per_step / tokens_per_s,
                "tokens_per_s": tokens_per_s,
            })
            print(f"{nodes} process(es): {seconds:.1f} s, {tokens_per_s:.0f} tokens/s",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| processes | step time s | tokens/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
                "preset": "configs/pretrain_from_scratch.toml, evaluation and intermediate checkpoints off",
                "rows": rows,
            }, f, indent=2)


if __name__ == "__main__":
    main()
