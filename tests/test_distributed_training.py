"""SASRec training on several processes (DDP on CPU, gloo): ``strategy="ddp_spawn"`` from a
library call, against the same training in one process.

Synthetic data: each user walks the 40 items in steps of 1 or 2 (wrapping), 10% of the events
replaced by random items, so the next item is predictable from the last ones while popularity
is not informative.
"""

from __future__ import annotations

import json
import os

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

from rec_models.data import UserSequences, leave_last_out
from rec_models.evaluation import PopularityRecommender, evaluate_ranking
from rec_models.models import RecommenderConfig, SASRecConfig, train_sasrec
from rec_models.models.distributed import build_trainer

N_ITEMS = 40
EPOCHS = 20


def walk_split(n_users: int = 200, seed: int = 0, noise: float = 0.1):
    rng = np.random.default_rng(seed)
    items, types = [], []
    for _ in range(n_users):
        start, length, step = rng.integers(0, N_ITEMS), rng.integers(10, 30), rng.integers(1, 3)
        seq = (start + step * np.arange(length)) % N_ITEMS + 1
        replaced = rng.random(length) < noise
        seq[replaced] = rng.integers(1, N_ITEMS + 1, size=replaced.sum())
        items.append(seq.astype(np.int64))
        types.append(np.full(length, 2, dtype=np.int64))
    return leave_last_out(UserSequences([f"u{u}" for u in range(n_users)], items, types))


def small_config(**overrides) -> SASRecConfig:
    settings = dict(n_items=N_ITEMS, d_model=32, n_layers=1, max_len=16, dropout=0.1, lr=1e-2, batch_size=32,
                    loss="ce", max_epochs=EPOCHS, patience=5)
    return SASRecConfig(**{**settings, **overrides})


class RankValidation(L.Callback):
    """Writes each rank's validation NDCG per epoch to ``folder/rank<r>.json`` (runs in the
    spawned processes: module level, so that it pickles)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.scores: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.scores.append(float(trainer.callback_metrics["val_ndcg@10"]))
        path = os.path.join(self.folder, f"rank{trainer.global_rank}.json")
        with open(path, "w") as file:
            json.dump({"world_size": trainer.world_size, "pid": os.getpid(), "scores": self.scores}, file)


def val_ndcg(backbone, split) -> float:
    val = split.val_histories()
    return evaluate_ranking(backbone.score_histories, val.items, split.val_targets, N_ITEMS,
                            event_types=val.event_types)["ndcg@10"]


def test_ddp_spawn_on_two_processes_matches_one_process(tmp_path, single_thread):
    split = walk_split()
    single, single_history = train_sasrec(split, small_config())
    ddp, history = train_sasrec(split, small_config(accelerator="cpu", devices=2, strategy="ddp_spawn"),
                                callbacks=[RankValidation(str(tmp_path))])

    # Two processes, each trained on its half of the windows every epoch.
    assert single_history["world_size"] == 1 and history["world_size"] == 2
    epochs = len(history["epochs"])
    half = -(-history["n_windows"] // 2)  # DistributedSampler pads to equal shards
    assert history["sequences_per_rank"] == [half * epochs] * 2
    assert single_history["sequences_per_rank"] == [single_history["n_windows"] * len(single_history["epochs"])]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["world_size"] for r in ranks} == {2}
    assert len({r["pid"] for r in ranks} | {os.getpid()}) == 3  # two spawned processes besides this one
    # Every rank saw the same validation NDCG every epoch (so they stop together), the history
    # recorded it, and the network that came back is the best epoch's.
    assert ranks[0]["scores"] == ranks[1]["scores"] == [e["val_ndcg@10"] for e in history["epochs"]]
    assert history["best_val_ndcg@10"] == pytest.approx(max(ranks[0]["scores"]))
    assert val_ndcg(ddp, split) == pytest.approx(history["best_val_ndcg@10"], abs=1e-5)
    assert not ddp.training

    popularity = PopularityRecommender().fit(split.train, N_ITEMS)
    val = split.val_histories()
    pop_ndcg = evaluate_ranking(popularity.score, val.items, split.val_targets, N_ITEMS)["ndcg@10"]
    single_ndcg = val_ndcg(single, split)
    print(f"\nval NDCG@10: popularity {pop_ndcg:.3f}, 1 process {single_ndcg:.3f} "
          f"({single_history['train_s']:.1f} s), DDP x2 {history['best_val_ndcg@10']:.3f} ({history['train_s']:.1f} s)")
    assert single_ndcg > pop_ndcg + 0.2
    assert history["best_val_ndcg@10"] >= 0.9 * single_ndcg
    assert history["best_val_ndcg@10"] > pop_ndcg + 0.2


def test_trainer_settings_and_launch_choices():
    config = small_config()
    trainer = build_trainer(config, logger=False)
    assert trainer.world_size == 1 and trainer.strategy.launcher is None  # today's single CPU process
    # "auto" with several devices spawns (Lightning's choice, "ddp", would re-run pytest's command line)
    trainer = build_trainer(small_config(devices=2), logger=False)
    assert isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and trainer.world_size == 2
    with pytest.raises(ValueError, match="ddp_spawn.*torchrun"):
        build_trainer(small_config(devices=2, strategy="ddp"), logger=False)
    with pytest.raises(ValueError, match="ddp_spawn"):
        train_sasrec(walk_split(20), small_config(devices=2, strategy="ddp"))

    # The recommender's settings reach SASRec and are saved with the model.
    recommender = RecommenderConfig.from_dict({"accelerator": "gpu", "devices": 4, "strategy": "ddp_spawn",
                                               "num_nodes": 2})
    sasrec = recommender.sasrec(n_items=N_ITEMS, text_dim=0)
    assert (sasrec.accelerator, sasrec.devices, sasrec.strategy, sasrec.num_nodes) == ("gpu", 4, "ddp_spawn", 2)
    assert RecommenderConfig.from_dict(recommender.to_dict()) == recommender
    assert SASRecConfig.from_dict(sasrec.to_dict()) == sasrec
    defaults = RecommenderConfig()
    assert (defaults.accelerator, defaults.devices, defaults.strategy, defaults.num_nodes) == ("cpu", 1, "auto", 1)
