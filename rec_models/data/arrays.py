"""Array helpers the data paths share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def unique_sorted(values) -> np.ndarray:
    """The sorted distinct values of an integer (or NaN-free) array, as ``np.unique(values)``,
    by a sort and a comparison of neighbours. numpy 2.4's ``np.unique`` without ``return_*``
    takes its hash path, which took 12.6 s for 10M int64 keys on this machine against 0.1 s for
    the sort; the lake's event keys and every item of a 10M-event history are arrays of that size."""
    values = np.sort(np.asarray(values).ravel())
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def narrowest(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as int8 or int32 when they fit (a quarter or half of int64's
    memory), anything else unchanged."""
    values = np.asarray(values)
    if values.dtype.kind in "iu" and len(values) and values.min() >= 0 and values.max() < 2**31:
        return values.astype(np.int8 if values.max() < 128 else np.int32, copy=False)
    return values


def list_array(values: np.ndarray | pa.Array, lengths: Sequence[int] | np.ndarray) -> pa.Array:
    """An Arrow list array of the flat ``values`` cut into lists of ``lengths``, built from the
    offsets (no Python object per value: at 10M values ~20x faster than a column of
    ``tolist()`` lists); a large list when the offsets pass int32."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = values if isinstance(values, pa.Array) else pa.array(values)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)


def split_lists(lists: pa.Array | pa.ChunkedArray, values: np.ndarray | None = None, dtype=None) -> list[np.ndarray]:
    """Per list of ``lists``, its values as a numpy array (views of one flat array, converted
    to ``dtype`` if given); ``values``: the flattened values already converted."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy()
    if values is None:
        values = lists.flatten().to_numpy(zero_copy_only=False)
        values = values if dtype is None else values.astype(dtype)
    return split_at(values, offsets - offsets[0]) if len(offsets) > 1 else []


def split_at(values: np.ndarray, offsets: np.ndarray | Sequence[int]) -> list[np.ndarray]:
    """``values[offsets[i]:offsets[i + 1]]`` for each i (views), as ``np.split(values,
    offsets[1:-1])`` when ``offsets`` runs from 0 to ``len(values)``: plain slices are 3x faster
    than ``np.split`` (250k pieces of 10M values: 0.05 against 0.17 s; at every load of the
    training data, whose pickle holds each user's arrays flat)."""
    bounds = np.asarray(offsets).tolist()
    return [values[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
