#!/usr/bin/env bash
# Where a decoded token's time goes on the device, per kernel: runs `layerskip infer --json` twice
# (8 and 40 new tokens, so prefill and start-up cancel out) with CubeCL's profiling log at
# "basic" (every launch is timed between two synchronisations, so a figure is the kernel plus
# one launch's overhead), and prints each kernel's time per token and its share. Where Nsight
# Systems (`nsys`) is installed it also prints its kernel table for the 40-token run, which
# times kernels on the device without the synchronisations.
#
#   scripts/gpu/kernel_profile.sh [BINARY] [MODEL] [DEVICE] [infer flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$(realpath "${1:-$root/target/release/layerskip}")"
model="$(realpath "${2:-$root/models/default}")"
device="${3:-cuda}"
shift $(($# < 3 ? $# : 3))
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/cubecl.toml" <<'TOML'
[profiling.logger]
level = "basic"
file = "profile.log"
append = false
TOML
run() { # tokens -> profile log copy
    (cd "$work" && rm -f profile.log && "$bin" infer --device "$device" --model "$model" \
        --prompt 'def fibonacci(n):' --max-new-tokens "$1" --strategy ar --json "${@:2}" \
        >"out$1.json" 2>"err$1.txt") || { cat "$work/err$1.txt" >&2; exit 1; }
    cp "$work/profile.log" "$work/profile$1.log"
}
run 8 "$@"
run 40 "$@"
python3 - "$work" <<'PY'
import collections, json, re, sys
work = sys.argv[1]
unit = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
def totals(path):
    t, n = collections.Counter(), collections.Counter()
    for line in open(path, errors="replace"):
        m = re.match(r"\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+)", line)
        if m:
            name = re.sub(r"<.*", "", m.group(3).strip())
            t[name] += float(m.group(1)) * unit[m.group(2)]
            n[name] += 1
    return t, n
t8, n8 = totals(f"{work}/profile8.log")
t40, n40 = totals(f"{work}/profile40.log")
tok = lambda f: json.load(open(f))["stats"]["new_tokens"]
tokens = tok(f"{work}/out40.json") - tok(f"{work}/out8.json")
rows = sorted(((t40[k] - t8[k]) / tokens, (n40[k] - n8[k]) / tokens, k) for k in t40)[::-1]
total = sum(r[0] for r in rows)
print(f"per token over {tokens} tokens: {total:.3f} ms in {sum(r[1] for r in rows):.1f} timed launches")
print(f"{'ms/token':>9} {'share':>6} {'launches':>8} {'us/launch':>9}  kernel")
for ms, count, name in rows:
    if count > 0:
        print(f"{ms:9.3f} {ms / total:6.1%} {count:8.1f} {1000 * ms / count:9.1f}  {name}")
PY
if command -v nsys >/dev/null 2>&1; then
    (cd "$work" && rm -f cubecl.toml && nsys profile -o trace --force-overwrite true "$bin" infer \
        --device "$device" --model "$model" --prompt 'def fibonacci(n):' --max-new-tokens 40 \
        --strategy ar --json "$@" >/dev/null 2>&1 &&
        nsys stats --report cuda_gpu_kern_sum,cuda_api_sum --format csv trace.nsys-rep 2>/dev/null |
        head -60) || echo "nsys failed"
else
    echo "nsys: not installed"
fi
