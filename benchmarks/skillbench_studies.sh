#!/usr/bin/env bash
# The SkillBench studies behind docs/benchmarks.md ("SkillBench: merges, compression, transfer").
# Usage: bash benchmarks/skillbench_studies.sh [CACHE_DIR]   (builds the full profile there first if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
CACHE=${1:-${SKILLGRAFT_CACHE:-}}
CACHE_ARGS=()
[ -n "$CACHE" ] && CACHE_ARGS=(--cache "$CACHE")
SG=.venv/bin/skillgraft
OUT=benchmarks/results
mkdir -p "$OUT"
$SG -q bench build --profile full "${CACHE_ARGS[@]}"
/usr/bin/time -v $SG -q study merge --profile full "${CACHE_ARGS[@]}" --n-skills 4 --n-skills 8 --limit 100 \
  -o $OUT/skillbench_merge.json --report $OUT/skillbench_merge.html 2> $OUT/skillbench_merge.time
/usr/bin/time -v $SG -q study compress --profile full "${CACHE_ARGS[@]}" --limit 100 \
  -o $OUT/skillbench_compress.json --report $OUT/skillbench_compress.html 2> $OUT/skillbench_compress.time
/usr/bin/time -v $SG -q study transfer --profile full "${CACHE_ARGS[@]}" --limit 100 \
  -o $OUT/skillbench_transfer.json --report $OUT/skillbench_transfer.html 2> $OUT/skillbench_transfer.time
