"""What a rerun costs: `python -m harness.run` commands, each a fresh process, into temporary output folders with
initially empty feature and results caches.

    python bench/bench_rerun.py [--task csv:../shared/data/ieee8023-covid-cxr/labels.csv] [--models pixels,random-vit]

1. first run: features extracted, every protocol's fits, heads and bootstrap computed, figures drawn;
2. rerun, nothing changed: features and per-model results read from the caches, figures left as they are;
3. one more model: a first run of every model but the last (into another empty cache), then the same command
   with the last model added, so only its features and work are computed (plus the paired comparisons and the
   outputs).

Prints each wall time and its ratio to the first run (the reference, measured in the same invocation), and the
results cache's own count of reused and computed model results. The machine's load is printed too: quote it with
the numbers. The default task is the shared real-radiograph set when `../shared` is beside the checkout, else a
demo phantom of the same order of size.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_CSV = REPO.parent / "shared" / "data" / "ieee8023-covid-cxr" / "labels.csv"


def run(models: str, task: str, out: Path, cache: Path) -> tuple[float, str]:
    """Wall time of one harness run in a fresh process, and its results-cache log line."""
    env = {**os.environ, "RADDINO_BENCH_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness.run", "--models", models, "--tasks", task,
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"harness.run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    counts = re.findall(r"(\d+) model result\(s\) reused, (\d+) computed", done.stderr)
    reused, computed = (sum(int(c[i]) for c in counts) for i in (0, 1))
    return seconds, f"{reused} model result(s) reused, {computed} computed"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=f"csv:{SHARED_CSV}" if SHARED_CSV.is_file() else "demo:n_patients=150",
                   help="the --tasks of the three runs (default: the shared set if present, else a demo phantom)")
    p.add_argument("--models", default="pixels,random-vit",
                   help="runs 1 and 2 use all but the last of these; run 3 adds the last")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if len(models) < 2:
        p.error("--models needs at least two models (the last one is the one added in run 3)")
    all_models, base_models = ",".join(models), ",".join(models[:-1])
    print(f"task {args.task}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
        root = Path(tmp)
        # The same models in runs 1 and 2; the "add one model" run starts from a cache that has all but the last.
        first, first_log = run(all_models, args.task, root / "a", root / "cache")
        again, again_log = run(all_models, args.task, root / "a", root / "cache")  # the same command again
        base, base_log = run(base_models, args.task, root / "c", root / "cache2")
        added, added_log = run(all_models, args.task, root / "c", root / "cache2")  # into the finished run
    print(f"{'run':52s} {'wall s':>8s} {'ratio':>7s}  results cache")
    print(f"{'1. first run (' + all_models + ')':52s} {first:8.1f} {1:7.3f}  {first_log}")
    print(f"{'2. rerun, nothing changed':52s} {again:8.1f} {again / first:7.3f}  {again_log}")
    print(f"{'   first run of ' + base_models + ' (another cache)':52s} {base:8.1f} {base / first:7.3f}  {base_log}")
    print(f"{'3. then ' + models[-1] + ' added to it':52s} {added:8.1f} {added / first:7.3f}  {added_log}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
