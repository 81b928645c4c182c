#!/usr/bin/env bash
# Regenerate the committed leaderboards: the weight-free floors on the synthetic `demo` task and, when
# ../shared is present, on the shared real-CXR csv: tasks (ieee8023 adults; Kermany children, 5,190 images, with
# the label-efficiency protocol: its 1,096 test patients separate curves that ieee8023's 47 cannot). CI runs the same into a temporary folder and
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
# The floors only: pixels and random-vit need no weights, and random-vit's ViT-S/14 extraction of 5,190 images fits
# CI's time on 2 cores; a trained checkpoint would be a derivative of the shared images and is not committed
# (docs/pretraining.md has the trained encoder's numbers and the commands that made them).
kermany_csv="../shared/data/kermany-pediatric-cxr/labels.csv"
if [ -f "$kermany_csv" ]; then
  python -m harness.run --models "$models" --tasks "csv:$kermany_csv" --protocols linear,knn,label-efficiency \
    --label-fractions 0.01,0.05,0.25,1 --label-draws 5 --out "$out"
else
  echo "note: $kermany_csv not found; the Kermany leaderboard was not regenerated"
fi
