#!/usr/bin/env bash
# Default model v2 and its baseline (issue 19), trained on one GPU in one call: the corpus (this
# machine's Python standard library and permissively licensed packages, scripts/corpus.py),
# one tokenizer trained by `layerskip tokenizer`, a short calibration of both runs side by side to
# measure their throughput, then both runs at once with `steps` set so that they end inside the
# budget, each converted to a bf16 model directory. What comes back (under $OUT, 6 files): each
# model's gzipped model.safetensors in parts of <= 15 MiB (`cat ls.safetensors.gz.part* | gunzip`),
# the small files (configs, tokenizer, logs, corpus manifest) in v2-meta.tar.gz, train_v2.json
# (throughput, steps, tokens, held-out loss per exit) and train_v2.log.
#
#   OUT=... bash scripts/gpu/train_v2.sh      # on the GPU machine, from the repository root
#
# Environment: BIN (default target/gpu/layerskip, unpacked from layerskip.gz), DEV (cuda),
# BUDGET_S (560: the whole script), RESERVE_S (45: conversion and packing), CAL_STEPS (30),
# CORPUS_MAX_MB (300), DIST_MAX_MB (20), PRESET / BASE_PRESET (configs/default_v2.toml,
# configs/baseline_v2.toml), W (work directory). On this CPU machine, with a tiny preset, the same
# script checks its own plumbing: DEV=cpu PRESET=... BASE_PRESET=... BUDGET_S=200 CORPUS_MAX_MB=2.
set -uo pipefail
cd "$(dirname "$0")/../.."
t0=$(date +%s)
DEV=${DEV:-cuda}
BUDGET_S=${BUDGET_S:-560}
RESERVE_S=${RESERVE_S:-45}
CAL_STEPS=${CAL_STEPS:-30}
PRESET=${PRESET:-configs/default_v2.toml}
BASE_PRESET=${BASE_PRESET:-configs/baseline_v2.toml}
W=${W:-/tmp/layerskip-v2}
OUT=${OUT:-$W/out}
rm -rf "$W" && mkdir -p "$W" "$OUT"
LOG=$OUT/train_v2.log
say() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - ($(date +%s) - t0))); }

if [ -z "${BIN:-}" ]; then
    BIN=$W/layerskip
    gunzip -c target/gpu/layerskip.gz >"$BIN" && chmod +x "$BIN" || { say "no target/gpu/layerskip.gz"; exit 1; }
fi
if [ "$DEV" != cpu ]; then
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$(python3 -c "import glob,os;print(':'.join(sorted({os.path.dirname(p) for p in glob.glob('/opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib/lib*.so*')})))"):${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
fi

say "corpus"
python3 scripts/corpus.py --out "$W/corpus" --manifest "$OUT/corpus.json" \
    --max-mb "${CORPUS_MAX_MB:-300}" --dist-max-mb "${DIST_MAX_MB:-20}" 2>&1 | tee -a "$LOG"
say "tokenizer (on the standard library part)"
"$BIN" tokenizer --config "$PRESET" --data "$W/corpus/python-stdlib" --out "$W/tok" 2>&1 | tee -a "$LOG"
[ -f "$W/tok/tokenizer.json" ] || { say "no tokenizer"; exit 1; }

# A preset with `key = value` lines replaced (top-level keys only appear once in these presets).
preset_with() {
    local src=$1 dst=$2
    shift 2
    cp "$src" "$dst"
    for kv in "$@"; do sed -i -e "s/^${kv%%=*}= .*/${kv%%=*}= ${kv#*=}/" "$dst"; done
}
# One run: name, preset, output, log, time limit.
train() {
    timeout "$5" "$BIN" train --config "$2" --data "$W/corpus" --tokenizer "$W/tok" \
        --device "$DEV" --out "$3" >"$4" 2>&1
    echo "$1 rc=$?" | tee -a "$LOG"
}
# Steady-state tokens/s of a run's log: from the step lines a third of the way and at the end
# (each line's rate counts from the first step, compile included).
rate() {
    python3 - "$1" <<'EOF'
import re, sys
pts = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step (\d+)/\d+ .* (\d+) tok/s", open(sys.argv[1]).read(), re.M)]
if len(pts) < 2:
    print(0); sys.exit()
b = pts[-1]
a = min(pts, key=lambda p: abs(p[0] - b[0] / 3))
print(int((b[0] - a[0]) / (b[0] / b[1] - a[0] / a[1])) if b[0] > a[0] else 0)
EOF
}

cp "$PRESET" "$W/src_ls.toml"
cp "$BASE_PRESET" "$W/src_base.toml"
# Both runs side by side for CAL_STEPS steps: sets cal_wall, r_ls, r_base.
calibrate() {
    say "calibration: $CAL_STEPS steps of both runs side by side"
    for r in ls base; do
        preset_with "$W/src_$r.toml" "$W/cal_$r.toml" "steps =$CAL_STEPS" "eval_every =0" \
            "eval_batches =1" "save_every =0"
        rm -rf "$W/cal_$r"
    done
    local c0 limit
    c0=$(date +%s)
    limit=$(($(left) / 3))
    train cal_ls "$W/cal_ls.toml" "$W/cal_ls" "$W/cal_ls.log" "$limit" &
    train cal_base "$W/cal_base.toml" "$W/cal_base" "$W/cal_base.log" "$limit" &
    wait
    cal_wall=$(($(date +%s) - c0))
    tail -n 3 "$W/cal_ls.log" "$W/cal_base.log" | tee -a "$LOG"
    r_ls=$(rate "$W/cal_ls.log")
    r_base=$(rate "$W/cal_base.log")
}
calibrate
if { [ "$r_ls" = 0 ] || [ "$r_base" = 0 ]; } && grep -q '^mixed_precision = "bf16"' "$W/src_ls.toml"; then
    say "a calibration run failed with bf16 mixed precision: both runs again in f32"
    sed -i -e 's/^mixed_precision = .*/mixed_precision = "off"/' "$W/src_ls.toml" "$W/src_base.toml"
    calibrate
fi
per_step=$(python3 -c "import tomllib;c=tomllib.load(open('$W/src_ls.toml','rb'));print(c['optim']['batch_size']*c['optim']['grad_accum']*c['data']['seq_len'])")
steps=$(python3 - <<EOF
rate = min($r_ls, $r_base)
if rate <= 0:
    print(0)
else:
    # The calibration's wall time beyond its steps (reading, packing, compiling, evaluation, the
    # final save) comes again; the rest of the budget is steps at the slower run's rate, 8% spare.
    overhead = max($cal_wall - $CAL_STEPS * $per_step / rate, 0)
    print(max(int(($(left) - $RESERVE_S - overhead) * rate / $per_step * 0.92), 0))
EOF
)
say "rates: LayerSkip $r_ls, baseline $r_base tokens/s side by side; calibration ${cal_wall} s; $steps steps of $per_step tokens = $((steps * per_step)) tokens"
[ "$steps" -gt 0 ] || { say "no steps fit the budget"; exit 1; }

save=$(((steps + 3) / 4))
for r in ls base; do
    preset_with "$W/src_$r.toml" "$W/$r.toml" "steps =$steps" "eval_every =$save" "save_every =$save"
done
limit=$(($(left) - RESERVE_S + 15))
say "training both (limit ${limit} s each)"
train ls "$W/ls.toml" "$W/run_ls" "$W/ls.log" "$limit" &
train base "$W/base.toml" "$W/run_base" "$W/base.log" "$limit" &
wait
tail -n 4 "$W/ls.log" "$W/base.log" | tee -a "$LOG"

say "converting to bf16 model directories"
for r in ls base; do
    ckpt=$(ls -d "$W/run_$r"/checkpoint-* 2>/dev/null | sort | tail -n 1)
    [ -n "$ckpt" ] || { say "$r: no checkpoint"; continue; }
    "$BIN" convert --checkpoint "$ckpt" --out "$W/model_$r" --dtype bf16 2>&1 | tail -n 1 | tee -a "$LOG"
    gzip -1 -c "$W/model_$r/model.safetensors" | split -b 15M -d - "$OUT/$r.safetensors.gz.part"
    echo "$r: $ckpt" >>"$W/checkpoints.txt"
done
python3 - "$W" "$OUT/train_v2.json" "$steps" "$per_step" "$r_ls" "$r_base" "$cal_wall" <<'EOF'
import json, re, sys
w, out, steps, per_step, r_ls, r_base, cal = sys.argv[1:]
def final(log):
    try:
        text = open(log).read()
    except OSError:
        return {}
    evals = re.findall(r"^eval @ step (\d+): (.*)$", text, re.M)
    saved = re.findall(r"^saved \S+ \((\d+) s, (\d+) tokens/s\)", text, re.M)
    res = {}
    if evals:
        step, cells = evals[-1]
        res["eval_step"] = int(step)
        res["held_out_loss_per_exit"] = {int(l): float(v) for l, v in re.findall(r"exit (\d+): ([0-9.]+)", cells)}
    if saved:
        res["train_seconds"], res["tokens_per_s"] = int(saved[-1][0]), int(saved[-1][1])
    steps_done = re.findall(r"^step (\d+)/", text, re.M)
    res["last_logged_step"] = int(steps_done[-1]) if steps_done else 0
    return res
summary = {
    "steps": int(steps), "tokens_per_step": int(per_step), "tokens": int(steps) * int(per_step),
    "calibration": {"layerskip_tokens_per_s": int(r_ls), "baseline_tokens_per_s": int(r_base), "wall_s": int(cal)},
    "layerskip": final(f"{w}/ls.log"), "baseline": final(f"{w}/base.log"),
}
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps(summary))
EOF
mkdir -p "$W/meta"
cp "$W/ls.toml" "$W/meta/default_v2.run.toml"; cp "$W/base.toml" "$W/meta/baseline_v2.run.toml"
cp "$W/ls.log" "$W/meta/training_log_layerskip.txt"; cp "$W/base.log" "$W/meta/training_log_baseline.txt"
cp "$W/cal_ls.log" "$W/cal_base.log" "$W/tok/tokenizer.json" "$W/meta/" 2>/dev/null
cp "$W/checkpoints.txt" "$W/meta/" 2>/dev/null
for r in ls base; do cp "$W/model_$r/config.json" "$W/meta/config_$r.json" 2>/dev/null; done
tar -czf "$OUT/v2-meta.tar.gz" -C "$W" meta
say "done"
ls -la "$OUT" | tee -a "$LOG"
