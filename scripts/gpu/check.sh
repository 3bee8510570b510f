#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root after scripts/gpu/package.sh put
# the stripped CUDA binary and its inputs in target/gpu/. Each step runs under `timeout`; steps
# are skipped once the time budget (CHECK_BUDGET_S, default 420 s) is spent. Writes one log
# (check.log) and one summary (gpu_check.json, from summarize.py) into $OUT (default
# target/gpu/out). Ours and Hugging Face's figures come from the same run on the same card.
# GPU_DIR (default target/gpu) holds the binary to check, CHECK_WORK (default
# /tmp/layerskip-gpu-check) the step outputs, CKPT_DIR (default $CHECK_WORK/ckpt) the
# random-weight checkpoints: scripts/gpu/compare.sh runs two builds through this script.
set -uo pipefail
cd "$(dirname "$0")/../.."
G=${GPU_DIR:-target/gpu}
OUT=${OUT:-$G/out}
W=${CHECK_WORK:-/tmp/layerskip-gpu-check}
mkdir -p "$OUT" "$W"
LOG=$OUT/check.log
: >"$LOG"
budget=${CHECK_BUDGET_S:-420}
hard_cap=${CHECK_CAP_S:-500}
t0=$(date +%s)
libs=$(python3 -c "import glob,os;print(':'.join(sorted({os.path.dirname(p) for p in glob.glob('/opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib/lib*.so*')})))" 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${libs}:${LD_LIBRARY_PATH:-}
export LAYERSKIP_KERNEL_CACHE=$W/kernels
export PYTHONUNBUFFERED=1
rm -rf "$LAYERSKIP_KERNEL_CACHE"
BIN=$W/layerskip
gunzip -c $G/layerskip.gz >"$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$W/gpu.txt" 2>&1
echo "gpu: $(cat "$W/gpu.txt")  date: $(date -u +%F)  commit: $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$LOG"

# step NAME TIMEOUT_S COMMAND...: stdout to $W/NAME.out, everything to the log. No step starts
# after CHECK_BUDGET_S, and none runs past CHECK_CAP_S from the start. CHECK_STEPS="a b ..."
# runs only the steps named.
step() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${CHECK_STEPS:-}" ] && [[ " $CHECK_STEPS " != *" $name "* ]]; then
        return
    fi
    if (($(date +%s) - t0 > budget)); then
        echo "== $name skipped (budget)" | tee -a "$LOG"
        return
    fi
    local left=$((hard_cap - ($(date +%s) - t0)))
    ((limit > left)) && limit=$left
    local s
    s=$(date +%s.%N)
    echo "== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >"$W/$name.out" 2>"$W/$name.err"
    local rc=$?
    cat "$W/$name.out" "$W/$name.err" >>"$LOG"
    local secs
    secs=$(python3 -c "import time;print(f'{time.time()-$s:.1f}')")
    printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >>"$W/steps.tsv"
    echo "== $name rc=$rc ${secs}s" | tee -a "$LOG"
}

DEV=${DEVICE:-cuda}
M=models/default
DATA=(--num-samples 5 --max-new-tokens 64 --repeats 2 --warmup 1)
infer=("$BIN" infer --device "$DEV" --model $M --prompt "def fibonacci(n):" --max-new-tokens 32 --json)
step ttft_cold 180 "${infer[@]}" --no-warm-up
if [ "$(tail -1 "$W/steps.tsv" | cut -f2)" != 0 ]; then
    echo "== the first CUDA run failed: the remaining steps run with LAYERSKIP_CUBE_KERNELS=0" | tee -a "$LOG"
    export LAYERSKIP_CUBE_KERNELS=0
    step ttft_cold_kernels_off 180 "${infer[@]}" --no-warm-up
fi
step ttft_cached 120 "${infer[@]}" --no-warm-up
step ttft_warmed 120 "${infer[@]}"
step correctness_f32 180 "$BIN" correctness --device "$DEV" --model $M --num-samples 3 \
    --max-new-tokens 64 --exit-layers 1,2,4,6 --speculations 1,3,6
step sweep_f32 240 "$BIN" sweep --device "$DEV" --model $M "${DATA[@]}" --exit-layers 3,4,5,6,8 \
    --speculations 2,3,4,6 --out "$W/sweep"
step kernels_off 240 env LAYERSKIP_CUBE_KERNELS=0 "$BIN" bench --device "$DEV" --model $M "${DATA[@]}" \
    --strategy self-spec --exit-layer 5 --speculations 3 --json "$W/kernels_off.json"
HE=datasets/humaneval/HumanEval.jsonl.gz
step hf_default 180 env HF_PROMPTS=5 HF_CONFIGS=2 python3 $G/hf_ref.py $M cuda f32 $HE
CKPT=${CKPT_DIR:-$W/ckpt}
step make_checkpoints 240 python3 scripts/gpu/make_checkpoints.py "$CKPT" $G/smollm2-tokenizer.json
S=$CKPT/smollm2-135m-shaped
L=$CKPT/llama3.2-1b-shaped
AR=(--strategy ar --num-samples 3 --max-new-tokens 64 --repeats 1 --warmup 1)
step smollm2_f32 180 "$BIN" bench --device "$DEV" --model "$S" "${AR[@]}" --json "$W/smollm2_f32.json"
step smollm2_bf16 180 "$BIN" bench --device "$DEV" --dtype bf16 --model "$S" "${AR[@]}" --json "$W/smollm2_bf16.json"
step llama1b_bf16 240 "$BIN" bench --device "$DEV" --dtype bf16 --model "$L" "${AR[@]}" --json "$W/llama1b_bf16.json"
step hf_smollm2 180 env HF_PROMPTS=3 HF_CONFIGS=1 python3 $G/hf_ref.py "$S" cuda f32 $HE
step hf_smollm2_bf16 180 env HF_PROMPTS=3 HF_CONFIGS=1 python3 $G/hf_ref.py "$S" cuda bf16 $HE
step hf_llama1b 240 env HF_PROMPTS=3 HF_CONFIGS=1 python3 $G/hf_ref.py "$L" cuda bf16 $HE
step default_bf16 180 "$BIN" bench --device "$DEV" --dtype bf16 --model $M "${DATA[@]}" \
    --strategy self-spec --exit-layer 5 --speculations 3 --json "$W/default_bf16.json"
step correctness_bf16 120 "$BIN" correctness --device "$DEV" --dtype bf16 --model $M --num-samples 3 \
    --max-new-tokens 64 --exit-layers 1,2,4,6 --speculations 1,3,6
stdlib=$(python3 -c "import sysconfig;print(sysconfig.get_paths()['stdlib'])")
for batch in 8 64; do
    sed -e "s/^batch_size = .*/batch_size = $batch/" -e "s/^steps = .*/steps = 25/" \
        -e "s/^eval_every = .*/eval_every = 100000/" -e "s/^save_every = .*/save_every = 100000/" \
        configs/pretrain_from_scratch.toml >"$W/train_b$batch.toml"
    rm -rf "$W/run_b$batch"
    step "train_b$batch" 180 "$BIN" train --config "$W/train_b$batch.toml" --model $M \
        --data "$stdlib/email" --data "$stdlib/asyncio" --device "$DEV" --out "$W/run_b$batch"
done
step launches 180 bash scripts/count_launches.sh "$BIN" "$PWD/$M" "$DEV"
step profile_smollm2 120 bash scripts/gpu/kernel_profile.sh "$BIN" "$S" "$DEV"
step profile_llama1b_bf16 120 bash scripts/gpu/kernel_profile.sh "$BIN" "$L" "$DEV" --dtype bf16
python3 scripts/gpu/summarize.py "$W" "$OUT/gpu_check.json" 2>&1 | tee -a "$LOG"
echo "total $(($(date +%s) - t0)) s" | tee -a "$LOG"
