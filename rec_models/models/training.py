"""Training SASRec with Lightning: the ``LightningModule``, early stopping on validation
NDCG@10 (of the blend with a partner model, when given), warm starts, SVD initialisation,
and top-k recommendation from a trained backbone."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from rec_models.data import LeaveLastOutSplit
from rec_models.evaluation import RankingMetrics, eval_batch_size, pad_histories
from rec_models.models.data_module import SequenceDataModule
from rec_models.models.distributed import (
    HandoffCallback,
    build_trainer,
    from_rank_zero,
    per_rank,
    quiet_warnings,
    restored_environment,
)
from rec_models.models.hybrid import blend, standardize_scores, standardized_scores
from rec_models.models.losses import LOSSES, SAMPLED_LOSSES, sample_negatives
from rec_models.models.sasrec import (
    DEFAULT_ALPHAS,
    HYBRID_MONITOR,
    MONITOR,
    SVD_INIT_NORM,
    VAL_K,
    SASRecBackbone,
    SASRecConfig,
)

FUSED_DEVICES = {"cpu", "cuda"}
"""Devices whose parameters AdamW updates with its fused kernel."""


class SASRecModule(L.LightningModule):
    """Lightning wrapper: named loss for training, full-ranking NDCG/HR@10 for validation."""

    def __init__(
        self,
        backbone: SASRecBackbone,
        candidate_items: torch.Tensor | None = None,
        blend_with: Callable | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        backbone._frozen_items = None  # training changes the item table
        self.config = backbone.config
        self.save_hyperparameters(self.config.to_dict())
        if self.config.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.config.loss!r}; choose from {sorted(LOSSES)}")
        self.loss_fn = LOSSES[self.config.loss]
        if candidate_items is None:
            candidate_items = torch.ones(self.config.n_items + 1, dtype=torch.bool)
        candidate_items = candidate_items.clone()
        candidate_items[0] = False
        self.register_buffer("candidate_items", candidate_items, persistent=False)
        self.val_metrics = RankingMetrics(self.config.n_items, VAL_K)
        # With a blend partner, validation also scores alpha * model + (1 - alpha) * partner.
        self.blend_with = blend_with
        self.blend_metrics = (
            {float(a): RankingMetrics(self.config.n_items, VAL_K) for a in alphas} if blend_with else {}
        )
        self.blend_results: dict[float, float] = {}
        self.own_val_ndcg: float | None = None
        self.sequences_seen = 0
        # A sampled loss reads the rows of the batch's items and its negatives only: the step
        # computes those rows of the item table, not all of them (at 100k items 0.13 -> 0.02 s
        # of a 0.18 s step); the negatives are drawn as the loss would draw them.
        self.compact_item_table = self.config.loss in SAMPLED_LOSSES

    def _step_rows(self, items: torch.Tensor, targets: torch.Tensor):
        """``(items, targets, rows, negatives)``: ``rows`` the sorted distinct item indices the
        batch and a draw of negatives name (with 0, so that local 0 is still padding), the
        others renumbered into it."""
        negatives = sample_negatives(self.candidate_items, self.config.n_negatives)
        padding = torch.zeros(1, dtype=items.dtype, device=items.device)
        rows, local = torch.unique(torch.cat([padding, items.flatten(), targets, negatives]), return_inverse=True)
        start = 1 + items.numel()
        return (local[1:start].view_as(items), local[start:start + len(targets)], rows,
                local[start + len(targets):])

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        items, event_types, targets = batch
        drop_ids = None
        if self.config.id_dropout > 0:
            drop_ids = torch.rand(len(self.candidate_items), device=self.device) < self.config.id_dropout
        counted = targets > 0
        targets, rows, negatives = targets[counted], None, None
        if self.compact_item_table:
            items, targets, rows, negatives = self._step_rows(items, targets)
        item_reps = self.backbone.item_representations(drop_ids, rows)
        hidden = self.backbone(items, event_types, item_reps)
        hidden, outputs = self.backbone.output_layer(
            hidden[counted], item_reps, self.backbone.item_biases(drop_ids, rows)
        )
        loss = self.loss_fn(hidden, targets, outputs, self.candidate_items, self.config.n_negatives,
                            negatives=negatives)
        self.sequences_seen += len(items)
        self.log(  # the mean over the ranks' losses with DDP
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(items), sync_dist=True
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self.backbone.freeze_item_table()  # the weights do not change until the epoch's end
        self.val_metrics.reset()
        for metric in self.blend_metrics.values():
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        histories, types, targets = batch["histories"], batch["event_types"], batch["targets"]
        scores = self.backbone.score_histories(histories, types)
        self.val_metrics.update(scores, histories, targets)
        if self.blend_with is not None:
            own = standardize_scores(scores)
            partner = standardized_scores(self.blend_with, histories, types)
            unseen = ~self.candidate_items.cpu()
            for alpha, metric in self.blend_metrics.items():
                metric.update(blend(own, partner, alpha, unseen), histories, targets)

    def on_validation_epoch_end(self) -> None:
        self.backbone.thaw_item_table()
        metrics = self.val_metrics.compute()
        blend_results = {a: m.compute()[f"ndcg@{VAL_K}"] for a, m in self.blend_metrics.items()}
        # With DDP every rank scored every validation user; rank 0's numbers are used on all
        # ranks, so they log the same values and take the same early-stopping decisions.
        metrics, self.blend_results = from_rank_zero(self._trainer, (metrics, blend_results))
        self.own_val_ndcg = float(metrics[f"ndcg@{VAL_K}"])
        self.log(MONITOR, metrics[f"ndcg@{VAL_K}"], on_epoch=True, prog_bar=True)
        self.log(f"val_hr@{VAL_K}", metrics[f"hr@{VAL_K}"], on_epoch=True)
        if self.blend_with is not None:
            self.log(HYBRID_MONITOR, max(self.blend_results.values()), on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        # Fused: one kernel updates every parameter (CPU, a 100k-item table: 9.3 -> 2.2 ms a
        # step); the same AdamW update, on the devices torch fuses for.
        fused = {p.device.type for p in trainable} <= FUSED_DEVICES
        return torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused)


class _BestEpochTracker(HandoffCallback):
    """Records each epoch's metrics and keeps an in-memory copy of the best weights; at the
    end of ``fit`` also how it stopped and the windows each rank trained on (handed back to
    the caller when rank 0 was a spawned process)."""

    def __init__(self, monitor: str = MONITOR) -> None:
        super().__init__()
        self.monitor = monitor
        self.epochs: list[dict] = []
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_blend: dict[float, float] = {}
        self.best_own: float | None = None  # the model's own val NDCG@10 at the kept epoch
        self._epoch_start = 0.0
        self.stopped_by: str | None = None
        self.sequences_per_rank: list[int] = []
        self.n_windows = 0
        self.loader_workers = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quiet_warnings()  # again: spawned ranks do not inherit the caller's warning filters

    def fit_results(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        early_stopping = trainer.early_stopping_callback
        if early_stopping is not None and early_stopping.stopped_epoch > 0:
            stopped_by = "patience"
        elif trainer.current_epoch >= trainer.max_epochs:
            stopped_by = "max_epochs"
        else:
            stopped_by = "max_time"  # the safety net: the result depends on machine speed
        return {"stopped_by": stopped_by, "epochs": self.epochs, "best_score": self.best_score,
                "best_state": self.best_state, "best_blend": self.best_blend, "best_own": self.best_own,
                "sequences_per_rank": per_rank(trainer, pl_module.sequences_seen),
                "n_windows": trainer.datamodule.n_windows,
                "loader_workers": trainer.datamodule.config.loader_workers if trainer.datamodule.streams() else 0}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        # Strictly better, like EarlyStopping with min_delta=0.
        if self.best_score is None or float(score) > self.best_score:
            self.best_score = float(score)
            self.best_state = snapshot(pl_module.backbone)
            self.best_blend = dict(pl_module.blend_results)
            self.best_own = pl_module.own_val_ndcg

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {"epoch": trainer.current_epoch}
        record.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        record["epoch_s"] = time.perf_counter() - self._epoch_start
        self.epochs.append(record)


def snapshot(backbone: SASRecBackbone) -> dict[str, torch.Tensor]:
    """A copy of the backbone's state to return to later; the text table, an input that
    training never changes, is referenced rather than copied."""
    return {name: value if name == "text_embeddings" else value.detach().clone()
            for name, value in backbone.state_dict().items()}


def _warm_start(backbone: SASRecBackbone, init_backbone: SASRecBackbone) -> None:
    """Copy ``init_backbone``'s weights into ``backbone`` (growing its item table if needed)."""
    text = getattr(init_backbone, "text_embeddings", None)
    source = copy.deepcopy(init_backbone, memo={id(text): text})  # the text table is shared, not copied
    n_items = backbone.config.n_items
    if source.config.n_items != n_items:
        source.grow(getattr(backbone, "text_embeddings", None), n_items=n_items)
    state = source.state_dict()
    if backbone.text_projection is not None:
        state["text_embeddings"] = backbone.text_embeddings  # the caller's text table wins
    backbone.load_state_dict(state)


def training_counts(split: LeaveLastOutSplit, n_items: int) -> np.ndarray:
    """Interactions per item in the training histories, int64 [n_items + 1]."""
    items = np.concatenate([*split.train.items, np.zeros(0, dtype=np.int64)])
    return np.bincount(items, minlength=n_items + 1)[: n_items + 1]


def svd_item_factors(
    histories: Sequence[np.ndarray], n_items: int, dim: int, max_norm: float = SVD_INIT_NORM
) -> torch.Tensor:
    """Collaborative item factors [n_items + 1, dim] from the binary user x item matrix.

    A randomized truncated SVD ``X ~ U S V^T`` (torch's RNG: seed it for determinism) gives
    ``V sqrt(S)``, scaled so the largest row norm is ``max_norm``. Dot products of these
    rows approximate item co-occurrence (PureSVD), a strong starting point for the tied
    input/output item table. Items without interactions get zero rows.
    """
    rows = np.concatenate([np.full(len(np.unique(h)), u) for u, h in enumerate(histories)] + [np.zeros(0, int)])
    cols = np.concatenate([np.unique(h) for h in histories] + [np.zeros(0, int)])
    matrix = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, cols]).astype(np.int64)),
        torch.ones(len(rows)),
        size=(len(histories), n_items + 1),
        check_invariants=True,
    ).coalesce()
    rank = min(dim, *matrix.shape)
    _, singular, right = torch.svd_lowrank(matrix, q=min(rank + 10, *matrix.shape), niter=4)
    factors = torch.zeros(n_items + 1, dim)
    factors[:, :rank] = right[:, :rank] * singular[:rank].sqrt()
    largest = factors.norm(dim=1).max()
    return factors * (max_norm / largest) if largest > 0 else factors


def _validation_scores(
    backbone: SASRecBackbone, split: LeaveLastOutSplit, blend_with: Callable | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS, unseen: torch.Tensor | None = None,
) -> tuple[float, dict[float, float]]:
    """Validation NDCG@10 of the model alone and ``{alpha: NDCG@10}`` of its blends with
    ``blend_with`` (empty without one): what ``SASRecModule`` validation reports."""
    val = split.val_histories()
    own = RankingMetrics(backbone.config.n_items, VAL_K)
    blends = {float(a): RankingMetrics(backbone.config.n_items, VAL_K) for a in alphas} if blend_with else {}
    size = eval_batch_size(backbone.config.n_items)
    with backbone.item_table_frozen():
        for start in range(0, len(val), size):
            batch, types = val.items[start : start + size], val.event_types[start : start + size]
            targets = split.val_targets[start : start + size]
            scores = backbone.score_histories(batch, types)
            own.update(scores, batch, targets)
            if blends:
                first, second = standardize_scores(scores), standardized_scores(blend_with, batch, types)
                for alpha, metric in blends.items():
                    metric.update(blend(first, second, alpha, unseen), batch, targets)
    return own.compute()[f"ndcg@{VAL_K}"], {a: m.compute()[f"ndcg@{VAL_K}"] for a, m in blends.items()}


def train_sasrec(
    split: LeaveLastOutSplit,
    config: SASRecConfig,
    text_embeddings: torch.Tensor | None = None,
    init_backbone: SASRecBackbone | None = None,
    max_time_s: float | None = None,
    logger=None,
    callbacks: Sequence[Callback] = (),
    users_subset: Sequence[int] | None = None,
    val_split: LeaveLastOutSplit | None = None,
    progress: bool = False,
    blend_with: Callable | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> tuple[SASRecBackbone, dict]:
    """Train with early stopping on val NDCG@10; return the best backbone and a history.

    ``init_backbone`` warm-starts from a previous model (grown to ``config.n_items`` if it has
    fewer items). ``users_subset`` trains on those users' windows only; ``val_split`` (default
    ``split``) holds the users validation scores. ``logger`` is any Lightning logger; per-epoch
    ``train_loss``, ``val_ndcg@10`` and ``val_hr@10`` are logged to it.

    The history dict holds ``epochs`` (one dict of metrics per epoch), ``best_val_ndcg@10``,
    ``stopped_by`` ("patience", "max_epochs" or "max_time": only the last depends on the
    machine's speed), ``train_s`` (wall time of ``fit``, validation included), ``sequences_per_s`` (training
    windows processed per second of ``train_s``, all ranks together), ``n_windows`` (windows
    per epoch), ``loader_workers`` (> 0: the windows were streamed from Parquet by that many loader
    processes, see ``data_module``), ``world_size`` and ``sequences_per_rank`` (windows each process
    trained on).

    The config's ``accelerator`` (default CPU), ``devices``, ``strategy`` and ``num_nodes`` go
    to Lightning's ``Trainer``. Several devices mean DDP: each of N processes trains on its
    shard of the windows, ``batch_size // N`` per step (the same steps as on one device), and
    validates on every user, rank 0's scores deciding for all. From a library call use
    ``strategy="ddp_spawn"`` (what ``"auto"`` picks): the ranks are spawned processes and the
    best network comes back to this one. ``"ddp"`` (it re-runs the command line) is refused
    unless ``torchrun``/SLURM started the processes: then every rank returns the same network
    (write from rank 0 only). Spawned ranks run pickled copies of ``logger``, ``callbacks``
    and ``blend_with``, not this process's objects. See ``rec_models.models.distributed``.

    ``blend_with`` (a score function, e.g. the content model's) trains the model as the
    sequential half of a hybrid: every validation also scores ``alpha * model + (1 - alpha) *
    partner`` (standardised, ``DEFAULT_ALPHAS``; the partner's score stands in for the model's
    on items absent from training, see ``blend``), early stopping and the kept epoch follow the
    best blend (``val_hybrid_ndcg@10``), and the history adds ``best_alpha``,
    ``best_val_hybrid_ndcg@10`` and ``blend_val_ndcg@10`` ({alpha: NDCG} at the kept epoch);
    ``best_val_ndcg@10`` stays the model's own. ``alphas`` restricts the blend weights (a
    fine-tune keeps its champion's with ``alphas=(alpha,)``). Choosing alpha and the epoch together keeps
    the choice of alpha fair: tuning it afterwards on the same validation users favours
    alpha = 1, whose epoch was already picked for its (noisy) validation score.
    """
    L.seed_everything(config.seed, workers=True, verbose=False)
    backbone = SASRecBackbone(config, text_embeddings)
    if init_backbone is not None:
        _warm_start(backbone, init_backbone)
    else:
        backbone.init_item_bias(training_counts(split, config.n_items))
        if config.id_init == "svd":
            backbone.init_id_embeddings(svd_item_factors(split.train.items, config.n_items, config.d_model))
        elif config.id_init != "default":
            raise ValueError(f"unknown id_init {config.id_init!r}; choose 'default' or 'svd'")
    data = SequenceDataModule(split, config, users_subset, val_split)  # data.val_split: split by default
    module = SASRecModule(backbone, data.candidate_items(), blend_with=blend_with, alphas=alphas)
    monitor = MONITOR if blend_with is None else HYBRID_MONITOR
    tracker = _BestEpochTracker(monitor)
    warm_start_score = None
    if init_backbone is not None:
        # A fine-tune never returns weights that are worse on validation than its start.
        own, blends = _validation_scores(backbone, data.val_split, blend_with, alphas, ~module.candidate_items.cpu())
        warm_start_score = own
        tracker.best_score = max(blends.values()) if blends else own
        tracker.best_state = snapshot(backbone)
        tracker.best_blend = blends
        tracker.best_own = own
    early_stopping = EarlyStopping(monitor, mode="max", patience=config.patience)

    with (tempfile.TemporaryDirectory() as root, warnings.catch_warnings(),
          restored_environment("MASTER_PORT")):
        quiet_warnings()
        tracker.handoff_path = os.path.join(root, "rank0_results.pt")
        trainer = build_trainer(
            config,
            max_epochs=config.max_epochs,
            max_time=None if max_time_s is None else timedelta(seconds=max_time_s),
            logger=logger if logger is not None else False,
            callbacks=[tracker, early_stopping, *callbacks],
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic="warn",
            default_root_dir=root,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        train_s = time.perf_counter() - start
        tracker.recover()  # ddp_spawn: the ranks were other processes

    backbone.thaw_item_table()  # a validation that did not reach its end (max_time) may have left one
    if tracker.best_state is not None:
        backbone.load_state_dict(tracker.best_state)
    backbone.cpu().eval()  # on CPU whatever the accelerator, like every other model here
    best = tracker.best_score
    if best is None:  # stopped (max_time) before the first validation: evaluate now
        best, tracker.best_blend = _validation_scores(backbone, data.val_split, blend_with, alphas, ~module.candidate_items.cpu())
    hybrid = {}
    if blend_with is not None:
        blend_results = tracker.best_blend
        alpha = max(sorted(blend_results, reverse=True), key=lambda a: blend_results[a])
        hybrid = {
            "best_alpha": alpha,
            f"best_val_hybrid_ndcg@{VAL_K}": blend_results[alpha],
            f"blend_val_ndcg@{VAL_K}": blend_results,
        }
        best = tracker.best_own if tracker.best_own is not None else blend_results.get(1.0, float("nan"))
    history = {
        "stopped_by": tracker.stopped_by,
        **hybrid,
        "epochs": tracker.epochs,
        f"best_val_ndcg@{VAL_K}": best,
        "train_s": train_s,
        "sequences_per_s": sum(tracker.sequences_per_rank) / train_s,
        "n_windows": tracker.n_windows,
        "loader_workers": tracker.loader_workers,  # > 0: the windows were streamed from Parquet by that many
        "world_size": len(tracker.sequences_per_rank),
        "sequences_per_rank": tracker.sequences_per_rank,
        "warm_start_val_ndcg@10": warm_start_score,
    }
    return backbone, history


def recommend(
    backbone: SASRecBackbone,
    histories: Sequence[np.ndarray],
    event_types: Sequence[np.ndarray] | None = None,
    k: int = 10,
    exclude_history: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item indices [B, k] (int64) and their scores [B, k] for each history."""
    all_items, all_scores = [], []
    size = eval_batch_size(backbone.config.n_items)
    for start in range(0, len(histories), size):
        batch = histories[start : start + size]
        batch_types = None if event_types is None else event_types[start : start + size]
        scores = backbone.score_histories(batch, batch_types)
        scores[:, 0] = -math.inf
        if exclude_history:
            scores = scores.scatter(1, pad_histories(batch), -math.inf)
        top = scores.topk(min(k, backbone.config.n_items), dim=1)
        all_items.append(top.indices.numpy())
        all_scores.append(top.values.numpy())
    if not all_items:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(all_items), np.concatenate(all_scores)
