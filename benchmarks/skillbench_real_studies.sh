#!/usr/bin/env bash
# The real-profile SkillBench studies behind docs/benchmarks.md ("SkillBench on SmolLM2-135M-Instruct").
# Usage: bash benchmarks/skillbench_real_studies.sh [CACHE_DIR] [LIMIT]   (builds the real profile there first)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
CACHE=${1:-${SKILLGRAFT_CACHE:-}}
LIMIT=${2:-50}
CACHE_ARGS=()
[ -n "$CACHE" ] && CACHE_ARGS=(--cache "$CACHE")
SG=.venv/bin/skillgraft
OUT=benchmarks/results
mkdir -p "$OUT"
$SG -q bench build --profile real "${CACHE_ARGS[@]}"
study() {  # NAME ARGS...: one study, its JSON, HTML report and /usr/bin/time output under $OUT
  local name=$1
  shift
  /usr/bin/time -v $SG -q study "$@" "${CACHE_ARGS[@]}" --limit "$LIMIT" \
    -o "$OUT/real_$name.json" --report "$OUT/real_$name.html" > "$OUT/real_$name.log" 2>&1
}
study merge_lora merge --profile real --experts lora --n-skills 4 --n-skills 6
study compress compress --profile real
study negate negate --profile real
study merge_full merge --profile real --experts full
