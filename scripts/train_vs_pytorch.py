#!/usr/bin/env python3
"""Training on the CPU: `layerskip train` against PyTorch eager on the same model, batch and exits.

Both trainers take the model shape, batch, sequence length, optimizer settings (AdamW, weight
decay, gradient clipping) and early-exit set of one of our presets:

- `layerskip`: `layerskip train --config PRESET --log-every 1` (the preset as shipped, or with
  `optim.mixed_precision = "bf16"`), stopped after N steps; steady tokens/s = the tokens of
  steps (warm-up, N] over their time.
- `pytorch`: transformers' `LlamaForCausalLM` of the same shape, the same exits through the
  shared final norm + LM head (`hidden_states` of the enabled layers; for the LayerSkip preset
  the rotational curriculum's layers of each step, so 4-5 exit losses a step), mean
  cross-entropy per exit, the loss weights of the preset's uniform scale, AdamW, clipping; f32
  or bf16 autocast; `torch.set_num_threads(THREADS)`; random tokens (a step's cost does not
  depend on the text). Layer dropout is left out there: the preset's rates start at 0
  (S_exp time curriculum) and are below 1% over the measured steps.

Every (trainer, precision) pair runs once per round, rounds alternate the order, each run in its
own process. Run with the interpreter scripts/install_torch.sh prints:

    python=$(bash scripts/install_torch.sh)
    cargo build --release -p layerskip-cli
    $python scripts/train_vs_pytorch.py --rounds 2 --out docs/results/train-vs-pytorch.json
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def exits_of_step(step, layers, period):
    """The rotational curriculum (schedule.rs): every `period`-th layer, shifted by one layer
    each step, the last layer always on."""
    enabled = {l for l in range(layers) if (l + period - step % period) % period == period - 1}
    enabled.add(layers - 1)
    return sorted(enabled)


def pytorch_run(preset, precision, steps, warmup, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, o = preset["model"], preset["optim"]
    seq, batch = preset["data"]["seq_len"], o["batch_size"]
    config = LlamaConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"],
        num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=m["max_position_embeddings"],
        rope_theta=m["rope_theta"],
        tie_word_embeddings=m["tie_word_embeddings"],
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
    layers = m["num_layers"]
    ee = preset.get("early_exit")
    period = ee["curriculum"]["period"] if ee else None
    times = []
    for step in range(steps):
        ids = torch.randint(0, m["vocab_size"], (batch, seq + 1))
        inputs, targets = ids[:, :-1], ids[:, 1:]
        start = time.perf_counter()
        enabled = exits_of_step(step, layers, period) if ee else [layers - 1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.model(input_ids=inputs, output_hidden_states=ee is not None)
            loss = 0.0
            for layer in enabled:
                if layer == layers - 1:
                    hidden = out.last_hidden_state  # already normed
                else:
                    hidden = model.model.norm(out.hidden_states[layer + 1])
                logits = model.lm_head(hidden).float()
                ce = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
                )
                loss = loss + ce / len(enabled)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        times.append(time.perf_counter() - start)
    steady = times[warmup:]
    return batch * seq * len(steady) / sum(steady)


STEP_LINE = re.compile(r"^step (\d+)/\d+ .* (\d+) tok/s")


def layerskip_run(binary, preset_path, precision, steps, warmup, threads, tokenizer):
    """Runs the preset as shipped (its own step count, so its schedules are the preset's),
    logging every step, and stops it after `steps` steps."""
    text = Path(preset_path).read_text()
    if precision == "bf16":
        text = text.replace("[optim]\n", '[optim]\nmixed_precision = "bf16"\n', 1)
    preset = tomllib.loads(text)
    o = preset["optim"]
    per_step = o["batch_size"] * preset["data"]["seq_len"] * o.get("grad_accum", 1)
    at = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "preset.toml"
        config.write_text(text)
        env = dict(os.environ, LAYERSKIP_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
        cmd = [binary, "train", "--config", str(config), "--log-every", "1",
               "--out", str(Path(tmp) / "run"), "--tokenizer", tokenizer]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True)
        tail = []
        for line in proc.stderr:
            tail = (tail + [line])[-20:]
            # Each line carries the cumulative rate since the loop started: t_k = tokens_k / r_k.
            if mt := STEP_LINE.match(line):
                k, rate = int(mt.group(1)), float(mt.group(2))
                at[k] = k * per_step / rate
                if k >= steps:
                    break
        proc.kill()
        proc.wait()
        if not at or max(at) < steps:
            sys.exit("layerskip train stopped early:\n" + "".join(tail))
    first, last = warmup, steps
    return (last - first) * per_step / (at[last] - at[first])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layerskip", default=str(ROOT / "target/release/layerskip"))
    p.add_argument("--presets", nargs="+",
                   default=["configs/pretrain_from_scratch.toml", "configs/baseline_from_scratch.toml"])
    p.add_argument("--precisions", nargs="+", default=["f32", "bf16"])
    p.add_argument("--trainers", nargs="+", default=["layerskip", "pytorch"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokenizer", help="tokenizer.json for our runs (default: one trained on the "
                   "first preset's data by `layerskip tokenizer`, once, before the timed runs)")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        preset_path, precision, threads = args.worker
        preset = tomllib.loads(Path(preset_path).read_text())
        print(pytorch_run(preset, precision, args.steps, args.warmup, int(threads)))
        return
    tok_dir = None  # removed when main returns
    if not args.tokenizer and "layerskip" in args.trainers:
        tok_dir = tempfile.TemporaryDirectory()
        # Its vocabulary must fit the presets' model.vocab_size; training it inside each timed
        # run would add minutes to the first step.
        subprocess.run([args.layerskip, "tokenizer", "--config", str(ROOT / args.presets[0]),
                        "--out", tok_dir.name], check=True, stdout=subprocess.DEVNULL)
        args.tokenizer = str(Path(tok_dir.name) / "tokenizer.json")
    runs = [(pr, tr, pc) for pr in args.presets for pc in args.precisions for tr in args.trainers]
    results = {}
    for r in range(args.rounds):
        order = runs if r % 2 == 0 else list(reversed(runs))
        for preset, trainer, precision in order:
            path = str(ROOT / preset)
            if trainer == "layerskip":
                rate = layerskip_run(args.layerskip, path, precision, args.steps, args.warmup,
                                     args.threads, args.tokenizer)
            else:
                proc = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps), "--warmup", str(args.warmup),
                     "--worker", path, precision, str(args.threads)],
                    capture_output=True, text=True, check=True)
                rate = float(proc.stdout.strip().splitlines()[-1])
            key = f"{Path(preset).stem} {trainer} {precision}"
            results.setdefault(key, []).append(rate)
            print(f"round {r + 1}: {key}: {rate:.0f} tokens/s", flush=True)
    print("\n| preset | trainer | precision | tokens/s (median) | runs |")
    print("|---|---|---|---|---|")
    for key, rates in results.items():
        preset, trainer, precision = key.split()
        print(f"| {preset} | {trainer} | {precision} | {statistics.median(rates):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in rates)} |")
    if args.out:
        import torch
        meta = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "steps": args.steps,
                "warmup": args.warmup, "torch": torch.__version__, "cpu": cpu_name()}
        Path(args.out).write_text(json.dumps({"meta": meta, "tokens_per_s": results}, indent=1) + "\n")


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
