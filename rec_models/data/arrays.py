"""Array helpers the data paths share."""

from __future__ import annotations

import numpy as np


def unique_sorted(values) -> np.ndarray:
    """The sorted distinct values of an integer (or NaN-free) array, as ``np.unique(values)``,
    by a sort and a comparison of neighbours. numpy 2.4's ``np.unique`` without ``return_*``
    takes its hash path, which took 12.6 s for 10M int64 keys on this machine against 0.1 s for
    the sort; the lake's event keys and every item of a 10M-event history are arrays of that size."""
    values = np.sort(np.asarray(values).ravel())
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values
