"""Feedback data: the event schema, per-user sequences and the leave-last-out split
(``sequences``), MovieLens loaders, per-user and per-item features, pseudonymous ids."""

from rec_models.data.arrays import list_array, narrowest, split_at, split_lists, unique_sorted
from rec_models.data.sequences import (
    MIN_RATING,
    ItemVocab,
    LeaveLastOutSplit,
    UserSequences,
    build_sequences,
    collapse_repeats,
    interactions,
    leave_last_out,
)

__all__ = ["MIN_RATING", "list_array", "narrowest", "split_at", "split_lists", "unique_sorted", "ItemVocab", "LeaveLastOutSplit", "UserSequences", "build_sequences", "collapse_repeats",
           "interactions", "leave_last_out"]
