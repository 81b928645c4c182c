#!/usr/bin/env bash
# Regenerate the committed leaderboards: the weight-free floors on the synthetic `demo` task and, when
# ../shared is present, on the shared real-CXR csv: task. CI runs the same into a temporary folder and
# compares every number with the committed files (harness.leaderboard check).
#   bash leaderboards/refresh.sh            # rewrite leaderboards/ in place
#   bash leaderboards/refresh.sh OUT_DIR    # write elsewhere (what CI does)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-leaderboards}"
# Features are cached where the harness puts them by default: $RADDINO_BENCH_CACHE, else .cache/raddino-bench.
models="pixels,random-vit"
python -m harness.run --models "$models" --tasks demo --out "$out"
shared_csv="../shared/data/ieee8023-covid-cxr/labels.csv"
if [ -f "$shared_csv" ]; then
  python -m harness.run --models "$models" --tasks "csv:$shared_csv" --out "$out"
else
  echo "note: $shared_csv not found; the shared-data leaderboard was not regenerated"
fi
