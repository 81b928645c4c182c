"""Vectorised patient bootstrap of AUROC/AUPRC against a plain loop of scikit-learn calls on the same resamples.

    python bench/bench_bootstrap.py [--images 3000] [--labels 14] [--resamples 1000] [--seed 0]

Both sides start from the same [B, N] weights of `harness.stats.bootstrap_weights` and produce the same [B, L]
AUROC and AUPRC arrays; the loop builds each resample explicitly (np.repeat) and calls roc_auc_score and
average_precision_score per label. The script checks they agree (max abs diff < 1e-9, NaN in the same places) and
prints both times (wall and CPU) and their ratios.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

# Runnable as `python bench/bench_bootstrap.py` from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.stats import binary_metrics, bootstrap_weights


def synthetic(n_images: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A probe-like test set: ~n/2 patients with 1-3 images each, prevalences from 0.2% (a handful of patients, so
    some resamples draw no positive and are undefined) to 30%, scores correlated within a patient, rounded to 4
    decimals so that some scores tie (as stored probabilities do)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, size=n_images)
    patient_of_image = np.repeat(np.arange(n_images), per_patient)[:n_images]
    n_patients = patient_of_image.max() + 1
    prevalence = np.linspace(0.002, 0.3, n_labels)
    patient_labels = rng.random((n_patients, n_labels)) < prevalence
    labels = patient_labels[patient_of_image].astype(np.int8)
    logits = 1.5 * labels + rng.normal(size=(n_patients, n_labels))[patient_of_image] + rng.normal(size=labels.shape)
    scores = np.round(1.0 / (1.0 + np.exp(-logits)), 4)
    return scores, labels, np.array([f"patient{p}" for p in patient_of_image])


def sklearn_loop(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    n_resamples, n_labels = len(weights), labels.shape[1]
    out = {"auroc": np.full((n_resamples, n_labels), np.nan), "auprc": np.full((n_resamples, n_labels), np.nan)}
    images = np.arange(len(scores))
    for b in range(n_resamples):
        idx = np.repeat(images, weights[b])
        for j in range(n_labels):
            y, s = labels[idx, j], scores[idx, j]
            n_pos = int(y.sum())
            if n_pos > 0:
                out["auprc"][b, j] = average_precision_score(y, s)
                if n_pos < len(y):
                    out["auroc"][b, j] = roc_auc_score(y, s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--labels", type=int, default=14)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scores, labels, patients = synthetic(args.images, args.labels, args.seed)
    weights = bootstrap_weights(patients, args.resamples, args.seed)
    print(f"{args.images} images, {len(set(patients))} patients, {args.labels} labels, {args.resamples} resamples")

    # Wall time and this process's CPU time: on a shared machine the CPU-time ratio is the steadier figure.
    wall, cpu = time.perf_counter(), time.process_time()
    fast = binary_metrics(scores, labels, weights)
    wall_fast, cpu_fast = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    slow = sklearn_loop(scores, labels, weights)
    wall_slow, cpu_slow = time.perf_counter() - wall, time.process_time() - cpu

    worst = 0.0
    for metric in ("auroc", "auprc"):
        same_nan = np.array_equal(np.isnan(fast[metric]), np.isnan(slow[metric]))
        assert same_nan, f"{metric}: undefined resamples differ between the two implementations"
        diff = np.nanmax(np.abs(fast[metric] - slow[metric]))
        undefined = int(np.isnan(fast[metric]).sum())
        print(f"{metric}: max abs diff {diff:.2e}, undefined (resample, label) cells {undefined}")
        worst = max(worst, float(diff))
    assert worst < 1e-9, f"vectorised and scikit-learn results differ by {worst}"
    for name, fast_s, slow_s in (("wall", wall_fast, wall_slow), ("cpu ", cpu_fast, cpu_slow)):
        print(f"{name}: vectorised {fast_s:.3f} s, scikit-learn loop {slow_s:.2f} s, ratio {slow_s / fast_s:.0f}x")


if __name__ == "__main__":
    main()
