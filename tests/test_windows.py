"""Training windows streamed from Parquet by loader worker processes (``StreamedWindows``):
the same windows as in memory, every one once per epoch, a new order per epoch, and a real
Lightning training that streams them."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_sasrec import N_ITEMS, cycle_split, small_config, text_table
from torch.utils.data import DataLoader

from rec_models.data import UserSequences
from rec_models.evaluation import PopularityRecommender, evaluate_ranking
from rec_models.models.data_module import SequenceDataModule
from rec_models.models.training import train_sasrec
from rec_models.models.windows import StreamedWindows, TrainingWindows, write_training_sequences


def _sequences(n_users: int = 400, seed: int = 0) -> UserSequences:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, n_users)
    return UserSequences([f"u{u}" for u in range(n_users)],
                         [rng.integers(1, 500, n).astype(np.int64) for n in lengths],
                         [rng.integers(0, 5, n).astype(np.int64) for n in lengths])


def _rows(batches) -> list[tuple]:
    return sorted((tuple(i.tolist()), tuple(t.tolist()), tuple(g.tolist()))
                  for items, types, targets in batches for i, t, g in zip(items, types, targets))


def _as_built(batch):
    return batch


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_windows_are_the_in_memory_windows_once_per_epoch_in_full_batches(tmp_path, workers):
    sequences = _sequences()
    path = tmp_path / "train.parquet"
    total = write_training_sequences(sequences, path, max_len=16, group_events=2_000)
    in_memory = TrainingWindows(sequences.items, sequences.event_types, 16)
    assert total == len(in_memory) > 1_000
    assert 5 < pq.ParquetFile(path).num_row_groups < 40

    dataset = StreamedWindows(path, max_len=16, batch_size=64)
    dataset.set_workers(max(workers, 1))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_built)
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(dataset)
        assert _rows(batches) == _rows([in_memory.__getitems__(np.arange(len(in_memory)))])
        # full batches but each worker's last (a batch may span two buffers of row groups)
        assert sum(len(b[0]) < 64 for b in batches) <= max(workers, 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(*epochs))  # a new shuffle per epoch


def test_streamed_windows_refuse_a_file_of_another_max_len(tmp_path):
    path = tmp_path / "train.parquet"
    write_training_sequences(_sequences(20), path, max_len=16)
    with pytest.raises(ValueError, match="max_len 16"):
        StreamedWindows(path, max_len=32, batch_size=8)


def test_a_full_training_streams_its_windows_from_parquet_and_learns(single_thread):
    """Real Lightning training with one loader worker: the data module writes the training
    sequences to a temporary Parquet file, the worker streams the windows, the model learns
    the cycles as the in-memory training does, and the file is gone afterwards."""
    split = cycle_split()
    config = small_config(loader_workers=1)
    module = SequenceDataModule(split, config)
    module.setup("fit")
    spill = module._spill.name
    assert isinstance(module.train_windows, StreamedWindows)
    in_memory = TrainingWindows(split.train.items, split.train.event_types, config.max_len)
    assert module.n_windows == len(in_memory)
    # the module's loader: a persistent worker from the fork server, every window once per epoch, a new order each
    loader = module.train_dataloader()
    assert loader.persistent_workers and loader.multiprocessing_context.get_start_method() == "forkserver"
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert _rows(batches) == _rows([in_memory.__getitems__(np.arange(len(in_memory)))])
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    module.teardown("fit")
    assert not os.path.exists(spill)

    backbone, history = train_sasrec(split, config, text_table())
    val = split.val_histories()
    pop = PopularityRecommender().fit(split.train, N_ITEMS)
    pop_ndcg = evaluate_ranking(pop.score, val.items, split.val_targets, N_ITEMS)["ndcg@10"]
    assert history["best_val_ndcg@10"] > pop_ndcg + 0.3
    assert history["n_windows"] == module.n_windows
    assert sum(history["sequences_per_rank"]) == history["n_windows"] * len(history["epochs"])
