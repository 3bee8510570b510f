"""Collects the GPU check's outputs (scripts/gpu/check.sh) into one JSON summary.
Usage: summarize.py WORK_DIR OUT_JSON."""
import glob
import json
import os
import re
import sys

work, out = sys.argv[1], sys.argv[2]
summary = {}


def text(name):
    path = os.path.join(work, name)
    return open(path).read() if os.path.exists(path) else ""


def section(key, fn):
    try:
        value = fn()
        if value not in (None, {}, []):
            summary[key] = value
    except Exception as e:  # one broken step must not lose the others
        summary[key] = {"error": f"{type(e).__name__}: {e}"}


def report(r):
    keep = ["strategy", "time_per_token_ms", "tokens_per_second", "time_to_first_token_ms",
            "acceptance_rate", "mean_accepted_length", "speedup", "token_agreement", "mismatches"]
    return {k: r[k] for k in keep if k in r}


def bench(name):
    j = json.load(open(os.path.join(work, name)))
    return [report(r) for r in j["reports"]]


def infer(name):
    j = json.loads(text(name + ".out"))
    s = j["stats"]
    return {"time_to_first_token_ms": s["time_to_first_token_ms"], "ms_per_token": j["time_per_token_ms"],
            "tokens": s["new_tokens"], "host_reads": s.get("host_reads"),
            "tokens_match_cold": None}


section("gpu", lambda: text("gpu.txt").strip())
section("steps", lambda: [dict(zip(["step", "rc", "seconds"], l.split("\t")))
                          for l in text("steps.tsv").splitlines()])
for name in ["ttft_cold", "ttft_cached", "ttft_warmed"]:
    section(name, lambda n=name: infer(n))
for name in ["correctness_f32", "correctness_bf16"]:
    section(name, lambda n=name: [l for l in text(n + ".out").splitlines() if "checked" in l or "MISMATCH" in l or "tie" in l])


def sweep():
    rows = json.load(open(os.path.join(work, "sweep", "sweep.json")))
    rows = rows["reports"] if isinstance(rows, dict) else rows
    reps = [report(r) for r in rows]
    best = max((r for r in reps if r.get("speedup")), key=lambda r: r["speedup"], default=None)
    return {"best": best, "points": reps}


section("sweep_f32", sweep)
for name in ["smollm2_f32", "smollm2_bf16", "llama1b_bf16", "default_bf16", "kernels_off"]:
    section(name, lambda n=name: bench(n + ".json"))
for name in ["hf_default", "hf_smollm2", "hf_smollm2_bf16", "hf_llama1b"]:
    section(name, lambda n=name: [json.loads(l) for l in text(n + ".out").splitlines() if l.startswith("{")])
for batch in [8, 64]:
    def train(b=batch):
        err = text(f"train_b{b}.err")
        rates = [float(x) for x in re.findall(r"([0-9.]+) tok/s", err)]
        return {"batch": b, "tokens_per_s_last_steps": rates[-5:], "saved": re.findall(r"saved .*", err)[-1:]}
    section(f"train_b{batch}", train)
section("launches", lambda: text("launches.out").strip().splitlines())
for name in ["profile_smollm2", "profile_llama1b_bf16"]:
    section(name, lambda n=name: text(n + ".out").strip().splitlines()[:40])
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k not in ("steps",)}, indent=None)[:6000])
