#!/usr/bin/env bash
# Regenerate the committed leaderboards: the weight-free floors on the synthetic `demo` task and, when
# ../shared is present, on the shared real-CXR csv: task. CI runs the same into a temporary folder and
# compares every number with the committed files (harness.leaderboard check).
#   bash leaderboards/refresh.sh            # rewrite leaderboards/ in place
#   bash leaderboards/refresh.sh OUT_DIR    # write elsewhere (what CI does)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-leaderboards}"
# Features are computed afresh into a temporary cache (removed at exit) unless $RADDINO_BENCH_CACHE names one: CI
# regenerates from an empty cache, so the committed numbers must come from one too (numbers computed from features
# cached by an earlier commit once drifted past CI's tolerance).
if [ -z "${RADDINO_BENCH_CACHE:-}" ]; then
  RADDINO_BENCH_CACHE=$(mktemp -d)
  trap 'rm -rf "$RADDINO_BENCH_CACHE"' EXIT
fi
export RADDINO_BENCH_CACHE
models="pixels,random-vit"
# The default protocols plus the attentive probe, which is not a default (it reads every image's patch tokens and
# trains a pool per model) but costs about a minute per task at this size (docs/evaluate.md#attentive-probe).
protocols="linear,knn,seg,demographics,attentive"
python -m harness.run --models "$models" --tasks demo --protocols "$protocols" --out "$out"
shared_csv="../shared/data/ieee8023-covid-cxr/labels.csv"
if [ -f "$shared_csv" ]; then
  python -m harness.run --models "$models" --tasks "csv:$shared_csv" --protocols "$protocols" --out "$out"
else
  echo "note: $shared_csv not found; the shared-data leaderboard was not regenerated"
fi
# The Kermany pediatric set (5,190 images): the task on which the trainer's global feature is measured
# (docs/pretraining.md). Only `pixels` here: a ViT-S/14 at 224 px over 5,190 images costs CI several minutes on two
# cores, and trained checkpoints are not committed (they derive from the images). The set has no masks, sex or
# age, so only the two classification probes apply.
kermany_csv="../shared/data/kermany-pediatric-cxr/labels.csv"
if [ -f "$kermany_csv" ]; then
  python -m harness.run --models pixels --tasks "csv:$kermany_csv" --protocols linear,knn --out "$out"
else
  echo "note: $kermany_csv not found; the Kermany leaderboard was not regenerated"
fi
