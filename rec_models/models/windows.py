"""Training windows: half-overlapping windows of each user's sequence, every position a
target once, built batch by batch (``TrainingWindows``, in memory), or streamed from a Parquet
file of training sequences by ``DataLoader`` worker processes (``StreamedWindows``).

Streaming: ``write_training_sequences`` stores sequences (vocab indices and event features, one
row per user) in row groups of about ``GROUP_EVENTS`` events, with the number of training
windows of each group for a ``max_len``. ``StreamedWindows`` is the ``IterableDataset`` over
such a file: each loader worker takes every k-th row group, and per epoch walks its groups in a
new random order, ``BUFFER_GROUPS`` at a time; it builds those groups' windows with
``TrainingWindows``, shuffles them and yields whole batches (a batch may span two buffers, so a
worker's batches are full but its last). The process that trains then holds no window index
and builds no batch, and a worker's memory is a few row groups whatever the history's size.
An epoch trains on every window exactly once, as in memory; the shuffle mixes windows within
``BUFFER_GROUPS`` groups of users (in id order, unrelated to behaviour), not the whole history.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.context
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from rec_models.data import UserSequences, list_array, split_lists
from rec_models.data.arrays import narrowest


class TrainingWindows(Dataset):
    """Half-overlapping training windows of sequences, built batch by batch.

    A sequence of n + 1 items gives n (input, next item) pairs. Windows of ``max_len`` pairs
    end at n, n - max_len // 2, ... until one starts at the first pair; rows are left-padded.
    Each target is counted in exactly one window (elsewhere its target is 0 = ignored): in the
    window where it has most context, i.e. a window's last ``max_len // 2`` positions, or all
    positions of the earliest window.

    Only the sequences (one flat array, as narrow as the values allow) and three numbers per
    window are held; a batch's rows are built when the loader asks for them, so the memory of
    training does not grow with ``max_len`` x the windows (at 10M events the three int64 arrays of all
    windows took ~0.3 GB per network, twice that while built). ``__getitems__`` (what a
    ``DataLoader`` calls with a batch of window positions) builds the batch in one vectorised
    pass: three int64 tensors [len(indices), max_len], input items, input event types, targets.
    """

    def __init__(self, items: Sequence[np.ndarray], event_types: Sequence[np.ndarray], max_len: int) -> None:
        lengths = np.fromiter((len(s) for s in items), dtype=np.int64, count=len(items))
        if not np.array_equal(lengths, [len(t) for t in event_types]):
            raise ValueError("items and event_types differ in length for some sequence")
        self.max_len = max_len
        self.items = narrowest(np.concatenate(items)) if len(items) else np.zeros(0, dtype=np.int8)
        self.event_types = narrowest(np.concatenate(event_types)) if len(items) else np.zeros(0, dtype=np.int8)
        stride = max(max_len // 2, 1)
        pairs = np.maximum(lengths - 1, 0)
        counts = window_counts(lengths, max_len)
        sequence = np.repeat(np.arange(len(items)), counts)
        first = np.cumsum(counts) - counts
        rank = np.arange(len(sequence)) - np.repeat(first, counts)  # 0 = the window ending at n
        end = pairs[sequence] - rank * stride
        start = np.maximum(end - max_len, 0)
        offsets = np.cumsum(lengths) - lengths
        self.start = narrowest(offsets[sequence] + start)  # of the window's first input in self.items
        self.width = narrowest(end - start)
        self.counted = narrowest(np.where(start == 0, end - start, np.minimum(stride, end - start)))

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t[0] for t in self.__getitems__([index]))

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        start, width, counted = (a[indices].astype(np.int64)[:, None] for a in (self.start, self.width, self.counted))
        column = np.arange(self.max_len)
        offset = column - (self.max_len - width)  # position in the window's slice; < 0: padding
        flat = start + np.maximum(offset, 0)
        real = offset >= 0
        counted_here = column >= self.max_len - counted
        items = np.where(real, self.items[flat], 0)
        types = np.where(real, self.event_types[flat], 0)
        targets = np.where(counted_here, self.items[np.minimum(flat + 1, len(self.items) - 1)], 0)
        return tuple(torch.from_numpy(a.astype(np.int64)) for a in (items, types, targets))


def window_counts(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Training windows of sequences of ``lengths`` items (int64, per sequence): a sequence of
    n + 1 items has n pairs, one window for n <= max_len, then one more per ``max_len // 2``
    pairs (or part)."""
    stride = max(max_len // 2, 1)
    pairs = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    return np.where(pairs > max_len, 1 + -(-(pairs - max_len) // stride), (pairs > 0).astype(np.int64))


def build_training_windows(
    items: Sequence[np.ndarray],
    event_types: Sequence[np.ndarray],
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All training windows of ``TrainingWindows`` at once: (input items, input types, targets),
    each int64 [W, max_len], in sequence order and, per sequence, from the latest window back."""
    windows = TrainingWindows(items, event_types, max_len)
    return tuple(a.numpy() for a in windows.__getitems__(np.arange(len(windows))))


GROUP_EVENTS = 200_000
"""Events per row group (the unit a worker reads): ~1 MB of Parquet, ~8k windows at max_len 50."""
BUFFER_GROUPS = 4
"""Row groups whose windows are shuffled together."""
_META_KEY = b"recsys_windows"


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: from a fork server that imported this module (numpy, pyarrow,
    torch) once per process, not as a fork of the training process, so a worker holds its
    own few row groups and none of the trainer's memory (a fork would share the trainer's pages
    until touched, and count them in its RSS)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def write_training_sequences(sequences: UserSequences, path: str | Path, max_len: int,
                             group_events: int = GROUP_EVENTS) -> int:
    """Store ``sequences`` at ``path`` for ``StreamedWindows``; return the number of windows."""
    lengths = np.fromiter((len(s) for s in sequences.items), dtype=np.int64, count=len(sequences))
    ends = np.cumsum(lengths)
    # Cut at users: a group ends at the first user that takes it past ``group_events`` events.
    cuts = np.unique(np.searchsorted(ends, np.arange(group_events, int(ends[-1]) if len(ends) else 0, group_events),
                                     side="left") + 1) if len(ends) else np.zeros(0, np.int64)
    bounds = np.r_[0, cuts[cuts < len(lengths)], len(lengths)].astype(np.int64)
    counts = window_counts(lengths, max_len)
    windows = [int(counts[s:e].sum()) for s, e in zip(bounds[:-1], bounds[1:])]
    flat = lambda arrays, dtype: np.concatenate(arrays).astype(dtype) if len(arrays) else np.zeros(0, dtype)  # noqa: E731
    table = pa.table({"items": list_array(flat(sequences.items, np.int32), lengths),
                      "event_types": list_array(flat(sequences.event_types, np.int64), lengths)})
    table = table.replace_schema_metadata({_META_KEY: json.dumps({"max_len": max_len, "windows": windows})})
    with pq.ParquetWriter(path, table.schema) as writer:
        for s, e in zip(bounds[:-1], bounds[1:]):
            writer.write_table(table.slice(s, e - s), row_group_size=max(int(e - s), 1))
    return int(sum(windows))


class StreamedWindows(IterableDataset):
    """Batches of ``batch_size`` training windows of a ``write_training_sequences`` file (see
    the module's docstring). Each batch is ``TrainingWindows.__getitems__``'s: three int64
    tensors [batch, max_len] (input items, input event types, targets). Use it with
    ``DataLoader(dataset, batch_size=None, num_workers=...)``; ``len`` is the batches per epoch
    for that many workers (``set_workers``)."""

    def __init__(self, path: str | Path, max_len: int, batch_size: int, buffer_groups: int = BUFFER_GROUPS) -> None:
        self.path = str(path)
        meta = json.loads(pq.read_schema(self.path).metadata[_META_KEY])
        if meta["max_len"] != max_len:
            raise ValueError(f"{path} holds windows of max_len {meta['max_len']}, not {max_len}")
        self.group_windows = list(meta["windows"])
        self.max_len, self.batch_size, self.buffer_groups = max_len, batch_size, buffer_groups
        self.workers = 1
        self._epoch = 0  # counted by each copy of the dataset: a persistent worker's own

    @property
    def n_windows(self) -> int:
        return int(sum(self.group_windows))

    def set_workers(self, workers: int) -> None:
        self.workers = max(int(workers), 1)

    def _groups(self, worker: int, workers: int) -> list[int]:
        return [g for g in range(len(self.group_windows)) if g % workers == worker and self.group_windows[g]]

    def __len__(self) -> int:
        return sum(math.ceil(sum(self.group_windows[g] for g in self._groups(w, self.workers)) / self.batch_size)
                   for w in range(self.workers))

    def __iter__(self):
        info = get_worker_info()
        self._epoch += 1
        if info is None:  # in the training process: a seed from torch's generator (seeded by seed_everything)
            worker, workers, seed = 0, 1, int(torch.randint(2**62, ()).item())
        else:  # a worker's seed comes from the training process's generator; persistent workers count epochs
            worker, workers, seed = info.id, info.num_workers, info.seed
        rng = np.random.default_rng([seed, self._epoch])
        groups = rng.permutation(self._groups(worker, workers))
        source = pq.ParquetFile(self.path)
        carry = None
        for start in range(0, len(groups), self.buffer_groups):
            table = source.read_row_groups([int(g) for g in groups[start:start + self.buffer_groups]])
            windows = TrainingWindows(split_lists(table.column("items")), split_lists(table.column("event_types")),
                                      self.max_len)
            order = rng.permutation(len(windows))
            position = 0
            if carry is not None:  # complete the last buffer's partial batch first
                need = self.batch_size - len(carry[0])
                rest = windows.__getitems__(order[:need])
                carry, position = tuple(torch.cat(pair) for pair in zip(carry, rest)), need
                if len(carry[0]) < self.batch_size:
                    continue
                yield carry
                carry = None
            for begin in range(position, len(order), self.batch_size):
                batch = windows.__getitems__(order[begin:begin + self.batch_size])
                if len(batch[0]) < self.batch_size:
                    carry = batch
                else:
                    yield batch
        if carry is not None:
            yield carry
