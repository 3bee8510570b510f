#!/usr/bin/env bash
# Default model v2 (issue 32) on this CPU, a run of many hours resumed across sessions: the corpus
# (scripts/corpus.py: this machine's Python standard library and permissively licensed packages,
# with a manifest of their licenses) and one tokenizer (`layerskip tokenizer`) made once, then
# `layerskip train` of configs/default_v2_cpu.toml at the lowest priority, resumed (bit-exact)
# from the latest checkpoint when there is one. Idempotent: run it again after a stop.
#
#   bash scripts/train_v2_cpu.sh            # starts or resumes in the background, returns
#   RUN=/path WHICH=baseline bash scripts/train_v2_cpu.sh   # the baseline, same corpus/tokenizer
#   STEPS=6000 bash scripts/train_v2_cpu.sh   # resume and extend the run to 6000 steps (its
#                                              # schedules are fractions of the run: they stretch)
#
# Environment: RUN (run directory, outside the repository; default /work/runs/v2), WHICH (ls or
# baseline), BIN (default target/release/layerskip), CORPUS_MAX_MB (300), DIST_MAX_MB (20), STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-/work/runs/v2}
WHICH=${WHICH:-ls}
BIN=${BIN:-$PWD/target/release/layerskip}
case $WHICH in
    ls) PRESET=configs/default_v2_cpu.toml ;;
    baseline) PRESET=configs/baseline_v2_cpu.toml ;;
    *) echo "WHICH must be ls or baseline" >&2; exit 2 ;;
esac
mkdir -p "$RUN"
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p layerskip-cli" >&2; exit 1; }
if [ ! -f "$RUN/corpus.json" ]; then
    rm -rf "$RUN/corpus"
    python3 scripts/corpus.py --out "$RUN/corpus" --manifest "$RUN/corpus.json.tmp" \
        --max-mb "${CORPUS_MAX_MB:-300}" --dist-max-mb "${DIST_MAX_MB:-20}"
    mv "$RUN/corpus.json.tmp" "$RUN/corpus.json"
fi
if [ ! -f "$RUN/tok/tokenizer.json" ]; then
    nice -n 19 "$BIN" tokenizer --config "$PRESET" --data "$RUN/corpus/python-stdlib" --out "$RUN/tok"
fi
# A resumed run takes its config (the corpus paths included) from its checkpoint.
if ls -d "$RUN/$WHICH"/checkpoint-* >/dev/null 2>&1; then
    args=(--resume ${STEPS:+--steps "$STEPS"})
else
    args=(--config "$PRESET" --data "$RUN/corpus" --tokenizer "$RUN/tok")
fi
echo "$(date -u +%FT%TZ) start: ${args[*]}" >>"$RUN/$WHICH.log"
nohup nice -n 19 "$BIN" train "${args[@]}" --out "$RUN/$WHICH" --log-every 5 \
    >>"$RUN/$WHICH.log" 2>&1 </dev/null &
echo "training $WHICH in the background (pid $!): tail -f $RUN/$WHICH.log"
