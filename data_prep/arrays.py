"""NumPy helpers of the hot paths."""

from __future__ import annotations

import numpy as np


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique(a) of a 1-D array (its distinct values, ascending), by one sort. NumPy 2.3 and later find
    distinct values by hashing before sorting them, which measured 17 to 80 times slower than a sort on
    int64 arrays of many distinct values (NumPy 2.4.6: 6.4 s against 0.08 s for 5 M values; 7.7 ms
    against 0.5 ms for 40,000): the KG index's distinct triples, a batch's (sentence, entity) cells."""
    s = np.sort(np.asarray(a).ravel())
    keep = np.empty(len(s), dtype=bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def search(haystack: np.ndarray, needles: np.ndarray, side: str = "left") -> np.ndarray:
    """np.searchsorted(haystack, needles, side) with the needles looked up in ascending order: in a large
    haystack consecutive binary searches then walk nearby memory, which measured 4.6 times faster, the
    sort included, for 100,000 random needles in 2 M sorted uint64 (the alias hashes, the KG's pair
    keys) than in their own order."""
    order = np.argsort(needles, kind="stable")
    out = np.empty(len(needles), dtype=np.intp)
    out[order] = np.searchsorted(haystack, needles[order], side=side)  # type: ignore[call-overload]
    return out
