#!/usr/bin/env bash
# Default model v2 (issue 32): from the training run to a release candidate, with every figure the
# model card needs, in one directory outside the repository. Run it when the run has finished (or
# on any step, to look ahead); it changes nothing in the repository.
#
#   bash scripts/release_v2.sh            # the run's last AVG (5) checkpoints, averaged
#   STEP=6000 AVG=1 bash scripts/release_v2.sh   # one checkpoint, no averaging
#
# It writes $RUN/release-STEP-avgAVG/:
#   model/           the bf16 release (config.json, model.safetensors, tokenizer.json), the mean of
#                    the checkpoints' weights (`layerskip convert --checkpoint A B C`), with the
#                    recorded self-speculation point (layerskip.json, `sweep --record`)
#   eval.txt/.json   per-exit loss and agreement on the held-out split: the release, the last
#                    checkpoint alone, and the baseline's last checkpoint (it stopped at 1050)
#   humaneval.txt/.json   scripts/humaneval_quality.py on the release
#   sweep/           the E x d grid on 10 HumanEval prompts (what `--record` chose from)
#   adaptive.txt     `bench --strategy adaptive` against the recorded point, alternating twice
#   model/corpus.json, data.md   the corpus's manifest (scripts/corpus.py: every source, its
#                    version, license and size) beside the model, and as a table for its card
#
# Environment: RUN (default /work/runs/v2), STEP (default: the last checkpoint), AVG (5), BIN
# (default target/release/layerskip). Pause the training while it measures speed
# (`kill -STOP`/`-CONT` the `layerskip train` process): the sweep's figures are timings.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-/work/runs/v2}
AVG=${AVG:-5}
BIN=${BIN:-$PWD/target/release/layerskip}
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p layerskip-cli" >&2; exit 1; }
mapfile -t all < <(ls -d "$RUN"/ls/checkpoint-* | sort)
[ ${#all[@]} -gt 0 ] || { echo "no checkpoints under $RUN/ls" >&2; exit 1; }
if [ -n "${STEP:-}" ]; then
    last=$(printf '%s/ls/checkpoint-%06d' "$RUN" "$STEP")
    [ -d "$last" ] || { echo "no $last" >&2; exit 1; }
else
    last=${all[-1]}
fi
# The AVG checkpoints ending at $last.
chosen=()
for c in "${all[@]}"; do
    [[ "$c" > "$last" ]] && break
    chosen+=("$c")
done
chosen=("${chosen[@]: -$AVG}")
step=$((10#${last##*-}))
OUT=$RUN/release-$step-avg${#chosen[@]}
[ -e "$OUT" ] && { echo "$OUT exists: remove it to measure again" >&2; exit 1; }
mkdir -p "$OUT"
echo "release candidate from ${chosen[*]##*/} -> $OUT"

"$BIN" convert --checkpoint "${chosen[@]}" --dtype bf16 --out "$OUT/model"
baseline=$(ls -d "$RUN"/baseline/checkpoint-* | sort | tail -n 1)
"$BIN" eval --model "$OUT/model" --model "$last" --model "$baseline" \
    --config configs/default_v2_cpu.toml --json "$OUT/eval.json" 2>&1 |
    grep -v 'batches:' | tee "$OUT/eval.txt"
python3 scripts/humaneval_quality.py --layerskip "$BIN" --model "$OUT/model" \
    --json "$OUT/humaneval.json" | tee "$OUT/humaneval.txt"
"$BIN" sweep --model "$OUT/model" --dataset humaneval --num-samples 10 --max-new-tokens 64 \
    --exit-layers 3,4,5,6,7,8 --speculations 2,3,4,6 --out "$OUT/sweep" --record |
    tee "$OUT/sweep.txt"
for round in 1 2; do
    for strategy in "" "--strategy adaptive --speculations 6"; do
        # No strategy flags: the recorded point.
        # shellcheck disable=SC2086
        "$BIN" bench --model "$OUT/model" --max-new-tokens 64 $strategy 2>&1 |
            grep -E '^(SS|ADAPT)' | sed "s/^/round $round: /" | tee -a "$OUT/adaptive.txt"
    done
done
cp "$RUN/corpus.json" "$OUT/model/corpus.json"
python3 - "$RUN/corpus.json" >"$OUT/data.md" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
taken = m["taken"]
print(f"{len(taken)} sources, {m['total_bytes'] / 2**20:.1f} MiB of Python (Python {m['python']}; "
      f"at most {m['dist_max_mb']:g} MiB from one package; left out for their licenses: "
      f"{', '.join(m.get('not_taken_license', [])) or 'none'})\n")
print("| source | version | license | MiB |\n|---|---|---|---|")
for t in sorted(taken, key=lambda t: -t["bytes"]):
    print(f"| {t['name']} | {t['version']} | {t['license']} | {t['bytes'] / 2**20:.1f} |")
PY
echo "done: $OUT"
