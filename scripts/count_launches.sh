#!/usr/bin/env bash
# Kernel launches and host reads per generated token, counted on the CPU (no GPU needed): runs
# `layerskip infer --json` on a CubeCL backend (default wgpu, which Mesa's lavapipe serves on a
# machine without a GPU) with CubeCL's execution log on, for two generation lengths, and divides
# the difference by the difference in tokens (prefill and start-up cancel out).
#
#   scripts/count_launches.sh [BINARY] [MODEL] [DEVICE]
#
# BINARY defaults to target/release/layerskip (built with --features wgpu). Any build works, an
# old one too: CubeCL reads its log settings from cubecl.toml in the working directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(realpath "${1:-$root/target/release/layerskip}")"
model="$(realpath "${2:-$root/models/default}")"
device="${3:-wgpu}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat >"$work/cubecl.toml" <<'TOML'
[profiling.logger]
level = "minimal"
file = "launches.log"
append = false
TOML
prompt='def fibonacci(n):'
count() { # strategy args... -> "launches host_reads tokens"
    local n=$1; shift
    (cd "$work" && rm -f launches.log && "$bin" infer --device "$device" --model "$model" \
        --prompt "$prompt" --max-new-tokens "$n" --json "$@" >out.json 2>/dev/null)
    local launches
    launches=$(grep -c '^Executing' "$work/launches.log" || true)
    python3 - "$work/out.json" "$launches" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
s = j.get("stats", j)
print(sys.argv[2], s.get("host_reads", "na"), s["new_tokens"])
PY
}
printf '%-22s %14s %14s\n' strategy launches/token reads/token
# "recorded": no strategy flag, so the model's recorded point (its layerskip.json) where it has one.
for label in ar "self-spec E3 d4" recorded; do
    case $label in
        ar) flags=(--strategy ar) ;;
        recorded) flags=() ;;
        *) flags=(--strategy self-spec --exit-layer 3 --speculations 4) ;;
    esac
    read -r l1 r1 t1 <<<"$(count 8 "${flags[@]}")"
    read -r l2 r2 t2 <<<"$(count 40 "${flags[@]}")"
    reads="n/a"
    if [ "$r1" != na ]; then reads=$(python3 -c "print(f'{($r2-$r1)/($t2-$t1):.2f}')"); fi
    printf '%-22s %14s %14s\n' "$label" \
        "$(python3 -c "print(f'{($l2-$l1)/($t2-$t1):.1f}')")" "$reads"
done
