"""Training windows (half-overlapping, every position a target once), built batch by batch,
and the ``LightningDataModule`` that serves them, with the validation users."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from rec_models.data import LeaveLastOutSplit
from rec_models.data.arrays import narrowest
from rec_models.evaluation import eval_batch_size
from rec_models.models.distributed import train_sampler
from rec_models.models.sasrec import SASRecConfig


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
        # Windows per sequence: one for n <= max_len pairs, then one more per stride (or part).
        counts = np.where(pairs > max_len, 1 + -(-(pairs - max_len) // stride), (pairs > 0).astype(np.int64))
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


def build_training_windows(
    items: Sequence[np.ndarray],
    event_types: Sequence[np.ndarray],
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All training windows of ``TrainingWindows`` at once: (input items, input types, targets),
    each int64 [W, max_len], in sequence order and, per sequence, from the latest window back."""
    windows = TrainingWindows(items, event_types, max_len)
    return tuple(a.numpy() for a in windows.__getitems__(np.arange(len(windows))))


def _as_built(batch):
    """The loader's collate: ``TrainingWindows.__getitems__`` already returns the batch."""
    return batch


class SequenceDataModule(L.LightningDataModule):
    """Training windows from a split's training sequences, and validation users.

    ``users_subset`` (positions in ``split.train``) restricts the training windows, e.g. to
    users with new feedback plus a replay sample; validation uses ``val_split`` (default: every
    user of ``split``; a bounded sample of them on large data).
    On several processes (DDP) each rank trains on its shuffled shard of the windows, while
    validation is not sharded: every rank scores every user, so all ranks see the same
    validation NDCG and take the same early-stopping decisions (the trainer runs with
    ``use_distributed_sampler=False``, see ``distributed.build_trainer``).
    """

    def __init__(
        self,
        split: LeaveLastOutSplit,
        config: SASRecConfig,
        users_subset: Sequence[int] | None = None,
        val_split: LeaveLastOutSplit | None = None,
    ) -> None:
        super().__init__()
        self.split = split
        self.val_split = val_split if val_split is not None else split
        self.config = config
        self.users_subset = users_subset
        self.train_windows: TrainingWindows | None = None

    def candidate_items(self) -> torch.Tensor:
        """Bool [n_items + 1]: items occurring in any user's training sequence."""
        seen = np.zeros(self.config.n_items + 1, dtype=bool)
        if len(self.split.train):  # one flat index, not one per user (250k users: 0.9 -> 0.05 s)
            seen[np.concatenate(self.split.train.items)] = True
        seen[0] = False
        return torch.from_numpy(seen)

    def setup(self, stage: str | None = None) -> None:
        train = self.split.train
        if self.users_subset is not None:
            train = train.subset(self.users_subset)
        self.train_windows = TrainingWindows(train.items, train.event_types, self.config.max_len)
        if len(self.train_windows) == 0:
            raise ValueError("no training windows: every training sequence is shorter than 2")

    def train_dataloader(self) -> DataLoader:
        """``config.batch_size`` windows per step: with N processes, ``batch_size // N`` each
        (the optimisation, and so the model, does not depend on the number of devices)."""
        sampler = train_sampler(self.train_windows, self.trainer, self.config.seed)
        if sampler is None:  # the order of ``shuffle=True``: the same windows per step as before
            sampler, batch_size = RandomSampler(self.train_windows), self.config.batch_size
        else:
            batch_size = max(1, self.config.batch_size // sampler.num_replicas)
        # Each step asks the dataset for its whole batch (one vectorised build, nothing to collate);
        # Lightning finds a DistributedSampler under the batch sampler and sets its epoch.
        batches = BatchSampler(sampler, batch_size, drop_last=False)
        return DataLoader(self.train_windows, batch_sampler=batches, collate_fn=_as_built)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            range(len(self.val_split.train)), batch_size=eval_batch_size(self.config.n_items), collate_fn=self._val_batch
        )

    def _val_batch(self, positions: list[int]) -> dict:
        val = self.val_split
        return {
            "histories": [val.train.items[p] for p in positions],
            "event_types": [val.train.event_types[p] for p in positions],
            "targets": torch.from_numpy(val.val_targets[positions]),
        }
