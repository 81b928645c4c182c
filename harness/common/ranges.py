"""Plausible ranges of the values tasks read from their tables and headers: outside them a value is a data-entry
error and becomes missing (NaN), not an outlier that would skew the demographic analyses."""
from __future__ import annotations

import math

#: Ages from this on are impossible (the oldest verified human lived to 122); RSNA's headers have 148-155. One
#: limit for every task: the CSV task's, which the published real-data leaderboard (csv:ieee8023-covid-cxr) was
#: made with. The DICOM tasks used "above 120"; none of them feeds a published leaderboard, and those numbers do
#: not change (that table's ages are 25-85; the demo task draws its ages itself).
MAX_PLAUSIBLE_AGE = 125.0


def plausible_age(years: float) -> float:
    """`years` if it is a possible age (0 <= years < MAX_PLAUSIBLE_AGE), else NaN (also for NaN)."""
    return years if 0.0 <= years < MAX_PLAUSIBLE_AGE else math.nan
