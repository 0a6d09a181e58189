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
/usr/bin/time -v $SG -q study merge --profile real "${CACHE_ARGS[@]}" --n-skills 4 --n-skills 6 --limit "$LIMIT" \
  -o $OUT/real_merge.json --report $OUT/real_merge.html 2> $OUT/real_merge.time
/usr/bin/time -v $SG -q study compress --profile real "${CACHE_ARGS[@]}" --limit "$LIMIT" \
  -o $OUT/real_compress.json --report $OUT/real_compress.html 2> $OUT/real_compress.time
/usr/bin/time -v $SG -q study negate --profile real "${CACHE_ARGS[@]}" --limit "$LIMIT" \
  -o $OUT/real_negate.json --report $OUT/real_negate.html 2> $OUT/real_negate.time
