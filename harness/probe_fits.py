"""The logistic fits of the linear probe (`harness.probes.linear`), as units of work for its worker processes.

This module imports numpy and scikit-learn only: a worker process imports it to run a task, and importing the
harness's probes would pull in torch (seconds of CPU and ~300 MB per worker) for nothing. Every task runs with
one BLAS/OpenMP thread wherever it runs (in the caller's process or in a worker), so its numbers do not depend on
how many tasks run at once; and every array it hands to BLAS it allocates itself (a fancy-indexed copy or a
scaler's output), so their memory layout does not depend on that either.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController


@functools.cache
def _threadpools() -> ThreadpoolController:
    """This process's BLAS and OpenMP pools, found once: the scan of the loaded libraries costs ~5 ms, a task
    more than a hundred times. (The libraries the fits use are loaded by this module's imports, before it.)"""
    return ThreadpoolController()


class FitLog:
    """Counts logistic fits and those that hit max_iter: recorded in the results, not silenced."""

    def __init__(self) -> None:
        self.fits = 0
        self.not_converged = 0

    def add(self, other: FitLog) -> None:
        self.fits += other.fits
        self.not_converged += other.not_converged


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, seed: int, max_iter: int, log: FitLog | None = None
                 ) -> LogisticRegression:
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=1e-5, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        # The weakest penalties may stop short of convergence on separable folds; the CV scores the result as it
        # is (what the user would get), and the count goes into the results JSON. (catch_warnings is global state:
        # safe here because fits run one per process, never in threads.)
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    if log is not None:
        log.fits += 1
        log.not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf


def fold_scores(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, Cs: tuple[float, ...],
                seed: int, max_iter: int) -> tuple[np.ndarray, FitLog]:
    """Validation AUROC of each C on one cross-validation fold (features standardised on the fold's training rows,
    once for the whole grid), NaN for every C when either side of the fold holds one class; and the fits it took."""
    scores, log = np.full(len(Cs), np.nan), FitLog()
    if len(np.unique(y[train])) < 2 or len(np.unique(y[val])) < 2:
        return scores, log
    with _threadpools().limit(limits=1):
        scaler = StandardScaler().fit(x[train])
        xtr, xva = scaler.transform(x[train]), scaler.transform(x[val])
        for c, C in enumerate(Cs):
            clf = fit_logistic(xtr, y[train], C, seed, max_iter, log)
            scores[c] = roc_auc_score(y[val], clf.decision_function(xva))
    return scores, log


def refit_scores(x_train: np.ndarray, y: np.ndarray, x_test: np.ndarray, scaler: StandardScaler, C: float,
                 seed: int, max_iter: int) -> tuple[np.ndarray, FitLog]:
    """The final fit on the whole (standardised) training split at the chosen C; positive-class probabilities of
    the test rows, and the fit's log."""
    log = FitLog()
    with _threadpools().limit(limits=1):
        clf = fit_logistic(scaler.transform(x_train), y, C, seed, max_iter, log)
        return clf.predict_proba(scaler.transform(x_test))[:, 1], log
