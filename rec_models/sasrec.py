"""SASRec: a causal self-attention next-item recommender whose items also have a text side.

Item representation = learned ID embedding + linear projection of the item's LLM text
embedding. ID embeddings start at ZERO, and items that never occur in training are kept out
of the training softmax, so their ID rows stay zero: such an item (held out, or added later
with ``grow``) is scored from its text projection alone.

The network reads a user's latest ``max_len`` items (left-padded, so the last position is the
newest item), each as item representation + learned position embedding + event-type
embedding, through causal Transformer blocks. The hidden state at a position scores every
item by a dot product with the (shared) item representations.

Training (``train_sasrec``) uses every position of half-overlapping windows of each user's
training sequence, so each next-item target gives exactly one cross-entropy term per epoch;
it early-stops on validation NDCG@10 (full ranking, history masked, see
``rec_models.evaluation``) and keeps the best epoch's weights.

Options for small, sparse datasets (all off by default, so saved models keep loading):
``item_bias`` (a per-item score offset started at log(1 + training count), with a text part
for unseen items), ``id_init="svd"`` (ID embeddings start from truncated-SVD co-occurrence
factors of the training matrix), ``freeze_ids``, ``id_dropout`` (each step a share of items is
represented by text alone, as unseen items are, so the text side learns to carry an item),
``rating_features`` (event inputs distinguish half-star rating buckets, see
``event_features``). ``HybridScorer`` blends the model with another score function (the
content model) on standardised scores; ``train_sasrec(blend_with=...)`` picks the blend
weight together with the early-stopping epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rec_models.data import LeaveLastOutSplit
from rec_models.evaluation import RankingMetrics, pad_histories
from rec_models.schema import EVENT_TYPE_INDEX, EVENT_TYPES

VAL_K = 10
MONITOR = f"val_ndcg@{VAL_K}"
HYBRID_MONITOR = f"val_hybrid_ndcg@{VAL_K}"
"""Monitored instead of ``MONITOR`` when training with ``blend_with``: the best blend's NDCG."""
DEFAULT_ALPHAS = tuple(float(a) for a in np.round(np.linspace(0.0, 1.0, 11), 2))
DEFAULT_EVENT_TYPE = EVENT_TYPE_INDEX["click"]
"""Event type assumed for history items when the caller gives none."""
EVAL_BATCH_SIZE = 512
SVD_INIT_NORM = 3.0
"""Largest row norm of ``svd_item_factors`` (the scale that trained well on MovieLens)."""


@dataclass
class SASRecConfig:
    """Architecture and training settings. The item table has ``n_items + 1`` rows (0 = pad)."""

    n_items: int
    text_dim: int = 0  # 0 = no text side
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 128
    loss: str = "ce"  # a key of LOSSES
    n_negatives: int = 256  # used by loss="sampled"
    max_epochs: int = 30
    patience: int = 3
    seed: int = 0
    rating_features: bool = False  # event inputs may also be rating buckets (event_features)
    item_bias: bool = False  # a learned per-item score offset (initialised from popularity)
    id_init: str = "default"  # "svd": ID embeddings start from training co-occurrence factors
    id_dropout: float = 0.0  # share of items trained from text alone each step (text side only)
    freeze_ids: bool = False  # keep the ID embeddings at their initial values (e.g. SVD factors)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SASRecConfig:
        return cls(**data)


N_RATING_BUCKETS = 10
RATING_FEATURE_OFFSET = len(EVENT_TYPES) + 1
"""Rating ``r`` (0.5 .. 5 stars) is event feature ``RATING_FEATURE_OFFSET + bucket(r)``."""


def n_event_features(config: SASRecConfig) -> int:
    """Rows of the event-feature table: padding + event types (+ rating buckets)."""
    return RATING_FEATURE_OFFSET + (N_RATING_BUCKETS if config.rating_features else 0)


def event_features(events: pd.DataFrame) -> np.ndarray:
    """Per-event input feature for ``SASRecConfig(rating_features=True)`` models, int64.

    The event type's index (``schema.EVENT_TYPE_INDEX``), except that a rating with a
    value gets one index per half-star bucket, so the model reads how much the user liked
    the item. Pass as ``features`` to ``evaluation.protocol_sequences``.
    """
    features = np.array(events["event_type"].map(EVENT_TYPE_INDEX), dtype=np.int64)
    if "value" in events:
        value = events["value"].to_numpy(dtype=np.float64, na_value=np.nan)
        is_rating = (events["event_type"] == "rating").to_numpy(dtype=bool, na_value=False)
        rated = is_rating & ~np.isnan(value)
        buckets = np.clip(np.round(value[rated] * 2.0) - 1, 0, N_RATING_BUCKETS - 1)
        features[rated] = RATING_FEATURE_OFFSET + buckets.astype(np.int64)
    return features


# --- losses: (hidden [N, d], targets [N], item_reps [n+1, d], candidates [n+1] bool,
#              n_negatives) -> scalar. ``candidates`` marks the items allowed in the softmax.


def full_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_reps: torch.Tensor,
    candidates: torch.Tensor,
    n_negatives: int,
) -> torch.Tensor:
    """Cross-entropy over all candidate items."""
    logits = (hidden @ item_reps.T).masked_fill(~candidates, -math.inf)
    return F.cross_entropy(logits, targets)


def sampled_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_reps: torch.Tensor,
    candidates: torch.Tensor,
    n_negatives: int,
) -> torch.Tensor:
    """Cross-entropy of the target against ``n_negatives`` uniformly sampled candidates.

    The negatives are shared by the batch; a negative equal to a row's target is ignored.
    """
    pool = candidates.nonzero().squeeze(1)
    negatives = pool[torch.randint(len(pool), (n_negatives,), device=pool.device)]
    positive = (hidden * item_reps[targets]).sum(dim=1, keepdim=True)
    negative = (hidden @ item_reps[negatives].T).masked_fill(
        negatives[None, :] == targets[:, None], -math.inf
    )
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": full_softmax_loss,
    "sampled": sampled_softmax_loss,
}


class SASRecBackbone(nn.Module):
    """The SASRec network (plain ``nn.Module``; Lightning only wraps it for training)."""

    def __init__(self, config: SASRecConfig, text_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)  # own copy: grow() updates n_items
        d = config.d_model
        self.id_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        if config.text_dim:
            self._check_text(text_embeddings, config.n_items)
            self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())
            self.text_projection: nn.Linear | None = nn.Linear(config.text_dim, d)
            nn.init.zeros_(self.id_embedding.weight)
        else:
            if text_embeddings is not None:
                raise ValueError("text_embeddings given but config.text_dim is 0")
            self.text_projection = None
            nn.init.normal_(self.id_embedding.weight, std=0.02)
            with torch.no_grad():
                self.id_embedding.weight[0].zero_()
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.event_type_embedding = nn.Embedding(n_event_features(config), d, padding_idx=0)
        self.input_dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=d,
            nhead=config.n_heads,
            dim_feedforward=d,  # as in the SASRec paper
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d)
        # Zero for items never trained (padding, unseen, grown): only text ranks those.
        self.item_bias = nn.Parameter(torch.zeros(config.n_items + 1)) if config.item_bias else None
        # With a text side the bias also has a text part, so unseen items get one too.
        self.text_bias: nn.Linear | None = None
        if config.item_bias and config.text_dim:
            self.text_bias = nn.Linear(config.text_dim, 1)
            nn.init.zeros_(self.text_bias.weight)
            nn.init.zeros_(self.text_bias.bias)
        if config.id_dropout and not config.text_dim:
            raise ValueError("id_dropout needs a text side (text_dim > 0)")
        self.id_embedding.weight.requires_grad_(not config.freeze_ids)
        self._frozen_items: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def freeze_item_table(self) -> None:
        """Compute the item representations and biases once and reuse them in eval mode
        (serving: the weights no longer change). ``grow`` or training forgets them."""
        with torch.no_grad():
            self._frozen_items = (self.item_representations().detach(),
                                  None if self.item_bias is None else self.item_biases().detach())

    def _check_text(self, text_embeddings: torch.Tensor | None, n_items: int) -> None:
        expected = (n_items + 1, self.config.text_dim)
        if text_embeddings is None or tuple(text_embeddings.shape) != expected:
            shape = None if text_embeddings is None else tuple(text_embeddings.shape)
            raise ValueError(f"text_embeddings must have shape {expected}, got {shape}")

    def item_representations(self, drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[n_items + 1, d]: ID embedding + projected text embedding (row 0 = padding).

        Items marked in ``drop_ids`` (bool [n_items + 1]) are represented by their text alone,
        as if never seen in training (ID dropout).
        """
        reps = self.id_embedding.weight
        if drop_ids is not None:
            reps = reps * ~drop_ids[:, None]
        if self.text_projection is not None:
            reps = reps + self.text_projection(self.text_embeddings)
        return reps

    def item_biases(self, drop_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """[n_items + 1] score offsets: learned per-item bias (not for ``drop_ids``) + the
        text part; None without ``item_bias``."""
        if self.item_bias is None:
            return None
        bias = self.item_bias if drop_ids is None else self.item_bias * ~drop_ids
        if self.text_bias is not None:
            bias = bias + self.text_bias(self.text_embeddings).squeeze(1)
        return bias

    def output_layer(
        self, hidden: torch.Tensor, item_reps: torch.Tensor, item_biases: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, item_reps) whose dot products are the logits: with ``item_bias`` a
        constant-1 column is appended to ``hidden`` [..., d] and the biases (default
        ``item_biases()``) to ``item_reps``, so ``hidden @ item_reps.T`` = representation
        scores + item bias, and every loss works unchanged."""
        if self.item_bias is None:
            return hidden, item_reps
        if item_biases is None:
            item_biases = self.item_biases()
        ones = torch.ones(*hidden.shape[:-1], 1, dtype=hidden.dtype, device=hidden.device)
        return torch.cat([hidden, ones], dim=-1), torch.cat([item_reps, item_biases[:, None]], dim=1)

    def init_id_embeddings(self, factors: torch.Tensor) -> None:
        """Start the ID embeddings from ``factors`` [n_items + 1, d] (row 0 is zeroed).

        With a text side the text projection restarts at zero, so at first an item is its
        factor row; items without interactions (zero rows) gain a representation only as the
        projection learns to read their text.
        """
        if tuple(factors.shape) != tuple(self.id_embedding.weight.shape):
            raise ValueError(f"factors must have shape {tuple(self.id_embedding.weight.shape)}")
        with torch.no_grad():
            self.id_embedding.weight.copy_(factors)
            self.id_embedding.weight[0].zero_()
            if self.text_projection is not None:
                self.text_projection.weight.zero_()
                self.text_projection.bias.zero_()

    def init_item_bias(self, counts: torch.Tensor | np.ndarray) -> None:
        """Set the item bias to log(1 + training count) (a popularity prior), if it has one."""
        if self.item_bias is not None:
            with torch.no_grad():
                counts = torch.as_tensor(counts, dtype=torch.float32, device=self.item_bias.device)
                self.item_bias.copy_(torch.log1p(counts))

    def forward(
        self,
        items: torch.Tensor,
        event_types: torch.Tensor,
        item_reps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, L, d] for left-padded ``items`` / ``event_types`` [B, L].

        Position ``t`` only sees positions ``<= t``. Pass ``item_reps`` to reuse an
        ``item_representations()`` result already computed for this step.
        """
        length = items.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        if item_reps is None:
            item_reps = self.item_representations()
        # Positions are right-aligned: the newest item always has position max_len - 1.
        max_len = self.config.max_len
        positions = torch.arange(max_len - length, max_len, device=items.device)
        padding = items == 0
        x = item_reps[items] + self.position_embedding(positions)
        x = x + self.event_type_embedding(event_types)
        x = self.input_dropout(x * ~padding[..., None])

        # True = may not attend: future positions and padding. Every position may attend to
        # itself, so rows that are all padding stay finite (their outputs are never used).
        blocked = torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1)
        blocked = (blocked[None] | padding[:, None, :]) & ~torch.eye(
            length, dtype=torch.bool, device=items.device
        )
        mask = blocked.repeat_interleave(self.config.n_heads, dim=0)
        return self.output_norm(self.encoder(x, mask=mask))

    def score_next(self, items: torch.Tensor, event_types: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_items + 1] for the item following each LEFT-padded sequence."""
        frozen = None if self.training else self._frozen_items
        item_reps, biases = frozen if frozen is not None else (self.item_representations(), None)
        hidden, outputs = self.output_layer(self.forward(items, event_types, item_reps)[:, -1], item_reps, biases)
        return hidden @ outputs.T

    def score_histories(
        self,
        histories: Sequence[np.ndarray],
        event_types: Sequence[np.ndarray] | None = None,
    ) -> torch.Tensor:
        """Next-item logits [B, n_items + 1] for raw histories (eval mode, no gradients).

        Keeps each history's latest ``max_len`` items; missing event types default to click.
        A usable ``score_fn`` for ``evaluation.evaluate_ranking``.
        """
        items, types = left_pad(histories, event_types, self.config.max_len)
        device = self.id_embedding.weight.device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.score_next(items.to(device), types.to(device)).cpu()
        finally:
            self.train(was_training)

    def grow(
        self, new_text_embeddings: torch.Tensor | None = None, *, n_items: int | None = None
    ) -> None:
        """Extend the item tables to more items, keeping the rows of existing items.

        With a text side, ``new_text_embeddings`` [n_new_total + 1, text_dim] replaces the
        text table (its existing rows should be unchanged to keep old items' scores); without
        one, give ``n_items``. New ID rows are zero; ``config.n_items`` is updated.
        """
        if self.text_projection is not None:
            if new_text_embeddings is None:
                raise ValueError("this model has a text side: pass new_text_embeddings")
            n_items = len(new_text_embeddings) - 1 if n_items is None else n_items
            self._check_text(new_text_embeddings, n_items)
        elif new_text_embeddings is not None or n_items is None:
            raise ValueError("this model has no text side: pass n_items only")
        self._frozen_items = None
        old = self.id_embedding.weight.detach()
        if n_items < len(old) - 1:
            raise ValueError(f"cannot shrink from {len(old) - 1} to {n_items} items")

        grown = nn.Embedding(n_items + 1, self.config.d_model, padding_idx=0).to(old.device)
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[: len(old)] = old
        grown.weight.requires_grad_(not self.config.freeze_ids)
        self.id_embedding = grown
        if self.item_bias is not None:
            bias = torch.zeros(n_items + 1, device=old.device)
            bias[: len(old)] = self.item_bias.detach()
            self.item_bias = nn.Parameter(bias)
        if self.text_projection is not None:
            self.text_embeddings = new_text_embeddings.detach().float().clone().to(old.device)
        self.config.n_items = n_items


def left_pad(
    histories: Sequence[np.ndarray],
    event_types: Sequence[np.ndarray] | None,
    max_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latest ``max_len`` items of each history, left-padded with 0: two int64 [B, L] tensors."""
    width = max(1, min(max_len, max((len(h) for h in histories), default=0)))
    items = np.zeros((len(histories), width), dtype=np.int64)
    types = np.zeros((len(histories), width), dtype=np.int64)
    for row, history in enumerate(histories):
        n = min(len(history), width)
        if n == 0:
            continue
        items[row, width - n :] = history[-n:]
        if event_types is None:
            types[row, width - n :] = DEFAULT_EVENT_TYPE
        else:
            types[row, width - n :] = event_types[row][-n:]
    return torch.from_numpy(items), torch.from_numpy(types)


def build_training_windows(
    items: Sequence[np.ndarray],
    event_types: Sequence[np.ndarray],
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-overlapping training windows: (input items, input types, targets), each [W, max_len].

    A sequence of n + 1 items gives n (input, next item) pairs. Windows of ``max_len`` pairs
    end at n, n - max_len // 2, ... until one starts at the first pair; rows are left-padded.
    Each target is counted in exactly one window (elsewhere its target is 0 = ignored): in the
    window where it has most context, i.e. a window's last ``max_len // 2`` positions, or all
    positions of the earliest window.
    """
    stride = max(max_len // 2, 1)
    window_items, window_types, window_targets = [], [], []
    for seq, types in zip(items, event_types):
        end = len(seq) - 1
        while end > 0:
            start = max(end - max_len, 0)
            counted_from = start if start == 0 else end - stride
            width = end - start
            row_items = np.zeros(max_len, dtype=np.int64)
            row_types = np.zeros(max_len, dtype=np.int64)
            row_targets = np.zeros(max_len, dtype=np.int64)
            row_items[max_len - width :] = seq[start:end]
            row_types[max_len - width :] = types[start:end]
            row_targets[max_len - (end - counted_from) :] = seq[counted_from + 1 : end + 1]
            window_items.append(row_items)
            window_types.append(row_types)
            window_targets.append(row_targets)
            if start == 0:
                break
            end -= stride
    if not window_items:
        empty = np.zeros((0, max_len), dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return np.stack(window_items), np.stack(window_types), np.stack(window_targets)


class SequenceDataModule(L.LightningDataModule):
    """Training windows from a split's training sequences, and validation users.

    ``users_subset`` (positions in ``split.train``) restricts the training windows, e.g. to
    users with new feedback plus a replay sample; validation always uses every user.
    """

    def __init__(
        self,
        split: LeaveLastOutSplit,
        config: SASRecConfig,
        users_subset: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.split = split
        self.config = config
        self.users_subset = users_subset
        self.train_windows: TensorDataset | None = None

    def candidate_items(self) -> torch.Tensor:
        """Bool [n_items + 1]: items occurring in any user's training sequence."""
        seen = torch.zeros(self.config.n_items + 1, dtype=torch.bool)
        for items in self.split.train.items:
            seen[torch.from_numpy(items)] = True
        seen[0] = False
        return seen

    def setup(self, stage: str | None = None) -> None:
        train = self.split.train
        if self.users_subset is not None:
            train = train.subset(self.users_subset)
        arrays = build_training_windows(train.items, train.event_types, self.config.max_len)
        if len(arrays[0]) == 0:
            raise ValueError("no training windows: every training sequence is shorter than 2")
        self.train_windows = TensorDataset(*(torch.from_numpy(a) for a in arrays))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_windows, batch_size=self.config.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            range(len(self.split.train)), batch_size=EVAL_BATCH_SIZE, collate_fn=self._val_batch
        )

    def _val_batch(self, positions: list[int]) -> dict:
        return {
            "histories": [self.split.train.items[p] for p in positions],
            "event_types": [self.split.train.event_types[p] for p in positions],
            "targets": torch.from_numpy(self.split.val_targets[positions]),
        }


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

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        items, event_types, targets = batch
        drop_ids = None
        if self.config.id_dropout > 0:
            drop_ids = torch.rand(len(self.candidate_items), device=self.device) < self.config.id_dropout
        item_reps = self.backbone.item_representations(drop_ids)
        hidden = self.backbone(items, event_types, item_reps)
        counted = targets > 0
        hidden, outputs = self.backbone.output_layer(
            hidden[counted], item_reps, self.backbone.item_biases(drop_ids)
        )
        loss = self.loss_fn(hidden, targets[counted], outputs, self.candidate_items, self.config.n_negatives)
        self.sequences_seen += len(items)
        self.log(
            "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(items)
        )
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        for metric in self.blend_metrics.values():
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        histories, types, targets = batch["histories"], batch["event_types"], batch["targets"]
        scores = self.backbone.score_histories(histories, types)
        self.val_metrics.update(scores, histories, targets)
        if self.blend_with is not None:
            own = standardize_scores(scores)
            partner = standardize_scores(self.blend_with(histories, types))
            unseen = ~self.candidate_items.cpu()
            for alpha, metric in self.blend_metrics.items():
                metric.update(blend(own, partner, alpha, unseen), histories, targets)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.own_val_ndcg = float(metrics[f"ndcg@{VAL_K}"])
        self.log(MONITOR, metrics[f"ndcg@{VAL_K}"], on_epoch=True, prog_bar=True)
        self.log(f"val_hr@{VAL_K}", metrics[f"hr@{VAL_K}"], on_epoch=True)
        if self.blend_with is not None:
            self.blend_results = {a: m.compute()[f"ndcg@{VAL_K}"] for a, m in self.blend_metrics.items()}
            self.log(HYBRID_MONITOR, max(self.blend_results.values()), on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)


class _BestEpochTracker(Callback):
    """Records each epoch's metrics and keeps an in-memory copy of the best weights."""

    def __init__(self, monitor: str = MONITOR) -> None:
        self.monitor = monitor
        self.epochs: list[dict] = []
        self.best_score: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_blend: dict[float, float] = {}
        self.best_own: float | None = None  # the model's own val NDCG@10 at the kept epoch
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        # Strictly better, like EarlyStopping with min_delta=0.
        if self.best_score is None or float(score) > self.best_score:
            self.best_score = float(score)
            state = pl_module.backbone.state_dict()
            self.best_state = {name: value.detach().clone() for name, value in state.items()}
            self.best_blend = dict(pl_module.blend_results)
            self.best_own = pl_module.own_val_ndcg

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {"epoch": trainer.current_epoch}
        record.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        record["epoch_s"] = time.perf_counter() - self._epoch_start
        self.epochs.append(record)


def _warm_start(backbone: SASRecBackbone, init_backbone: SASRecBackbone) -> None:
    """Copy ``init_backbone``'s weights into ``backbone`` (growing its item table if needed)."""
    source = copy.deepcopy(init_backbone)
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
    for start in range(0, len(val), EVAL_BATCH_SIZE):
        batch = val.items[start : start + EVAL_BATCH_SIZE]
        types = val.event_types[start : start + EVAL_BATCH_SIZE]
        targets = split.val_targets[start : start + EVAL_BATCH_SIZE]
        scores = backbone.score_histories(batch, types)
        own.update(scores, batch, targets)
        if blends:
            first, second = standardize_scores(scores), standardize_scores(blend_with(batch, types))
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
    progress: bool = False,
    blend_with: Callable | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> tuple[SASRecBackbone, dict]:
    """Train on CPU with early stopping on val NDCG@10; return the best backbone and a history.

    ``init_backbone`` warm-starts from a previous model (grown to ``config.n_items`` if it has
    fewer items). ``users_subset`` trains on those users' windows only. ``logger`` is any
    Lightning logger (e.g. ``MLFlowLogger``); per-epoch ``train_loss``, ``val_ndcg@10`` and
    ``val_hr@10`` are logged to it (MLflow renames them ``val_ndcg10`` / ``val_hr10``).

    The history dict holds ``epochs`` (one dict of metrics per epoch), ``best_val_ndcg@10``,
    ``stopped_by`` ("patience", "max_epochs" or "max_time": only the last depends on the
    machine's speed), ``train_s`` (wall time of ``fit``, validation included), ``sequences_per_s`` (training
    windows processed per second of ``train_s``) and ``n_windows`` (windows per epoch).

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
    data = SequenceDataModule(split, config, users_subset)
    module = SASRecModule(backbone, data.candidate_items(), blend_with=blend_with, alphas=alphas)
    monitor = MONITOR if blend_with is None else HYBRID_MONITOR
    tracker = _BestEpochTracker(monitor)
    warm_start_score = None
    if init_backbone is not None:
        # A fine-tune never returns weights that are worse on validation than its start.
        own, blends = _validation_scores(backbone, split, blend_with, alphas, ~module.candidate_items)
        warm_start_score = own
        tracker.best_score = max(blends.values()) if blends else own
        tracker.best_state = {name: value.detach().clone() for name, value in backbone.state_dict().items()}
        tracker.best_blend = blends
        tracker.best_own = own
    early_stopping = EarlyStopping(monitor, mode="max", patience=config.patience)

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
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
        if early_stopping.stopped_epoch > 0:
            stopped_by = "patience"
        elif trainer.current_epoch >= config.max_epochs:
            stopped_by = "max_epochs"
        else:
            stopped_by = "max_time"  # the safety net: the result depends on machine speed

    if tracker.best_state is not None:
        backbone.load_state_dict(tracker.best_state)
    backbone.eval()
    best = tracker.best_score
    if best is None:  # stopped (max_time) before the first validation: evaluate now
        best, tracker.best_blend = _validation_scores(backbone, split, blend_with, alphas, ~module.candidate_items)
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
        "stopped_by": stopped_by,
        **hybrid,
        "epochs": tracker.epochs,
        f"best_val_ndcg@{VAL_K}": best,
        "train_s": train_s,
        "sequences_per_s": module.sequences_seen / train_s,
        "n_windows": len(data.train_windows),
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
    for start in range(0, len(histories), EVAL_BATCH_SIZE):
        batch = histories[start : start + EVAL_BATCH_SIZE]
        batch_types = None if event_types is None else event_types[start : start + EVAL_BATCH_SIZE]
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


def standardize_scores(scores: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per row, (score - mean) / std over the finite real-item columns (1..n).

    Non-finite entries (items a model cannot score) become the row's lowest finite value;
    column 0 (padding) becomes 0. Puts models with different score scales on one scale.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)[:, 1:]
    finite = torch.isfinite(scores)
    count = finite.sum(dim=1, keepdim=True).clamp(min=1)
    filled = torch.where(finite, scores, torch.zeros_like(scores))
    mean = filled.sum(dim=1, keepdim=True) / count
    centred = torch.where(finite, scores - mean, torch.zeros_like(scores))
    std = (centred.square().sum(dim=1, keepdim=True) / count).sqrt().clamp(min=1e-12)
    z = centred / std
    lowest = torch.where(finite, z, torch.full_like(z, math.inf)).min(dim=1, keepdim=True).values
    z = torch.where(finite, z, torch.where(torch.isfinite(lowest), lowest, torch.zeros_like(lowest)))
    return torch.cat([torch.zeros(len(z), 1), z], dim=1)


class HybridScorer:
    """``alpha * primary + (1 - alpha) * secondary`` on per-user standardised scores.

    The hook for blending the sequential model with the content (LLM text) model:
    ``HybridScorer(backbone.score_histories, content.score, alpha, unseen)``. Both score
    functions take ``(histories, event_types)``; ``score`` is itself such a function.
    ``unseen`` (bool [n_items + 1]) marks items the primary model never saw in training: it
    has no collaborative evidence about them, so the secondary's score stands in for its own
    there (see ``blend``).
    """

    def __init__(
        self, primary: Callable, secondary: Callable, alpha: float, unseen: torch.Tensor | None = None
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        self.primary = primary
        self.secondary = secondary
        self.alpha = alpha
        self.unseen = unseen

    def score(
        self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None
    ) -> torch.Tensor:
        second = standardize_scores(self.secondary(histories, event_types))
        if self.alpha == 0.0:
            return second
        first = standardize_scores(self.primary(histories, event_types))
        return blend(first, second, self.alpha, self.unseen)


def blend(
    primary: torch.Tensor, secondary: torch.Tensor, alpha: float, unseen: torch.Tensor | None = None
) -> torch.Tensor:
    """``alpha * primary + (1 - alpha) * secondary`` (inputs already standardised); in the
    columns marked ``unseen`` the primary's score is replaced by the secondary's."""
    if unseen is not None:
        primary = torch.where(unseen[None, :], secondary, primary)
    return alpha * primary + (1.0 - alpha) * secondary


def tune_hybrid(
    primary: Callable,
    secondary: Callable,
    split: LeaveLastOutSplit,
    n_items: int,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    unseen: torch.Tensor | None = None,
) -> tuple[HybridScorer, dict[float, float]]:
    """The ``HybridScorer`` whose ``alpha`` has the best validation NDCG@10.

    Each validation batch is scored once per model; every alpha is evaluated on the same
    standardised scores. Returns the scorer and ``{alpha: val_ndcg@10}`` (ties: larger alpha).
    """
    metrics = {alpha: RankingMetrics(n_items, VAL_K) for alpha in alphas}
    histories = split.val_histories()
    for start in range(0, len(histories), EVAL_BATCH_SIZE):
        batch = histories.items[start : start + EVAL_BATCH_SIZE]
        types = histories.event_types[start : start + EVAL_BATCH_SIZE]
        targets = split.val_targets[start : start + EVAL_BATCH_SIZE]
        first = standardize_scores(primary(batch, types))
        second = standardize_scores(secondary(batch, types))
        for alpha, metric in metrics.items():
            metric.update(blend(first, second, alpha, unseen), batch, targets)
    results = {float(alpha): metric.compute()[f"ndcg@{VAL_K}"] for alpha, metric in metrics.items()}
    best = max(sorted(results, reverse=True), key=lambda alpha: results[alpha])
    return HybridScorer(primary, secondary, best, unseen), results


def save_backbone(backbone: SASRecBackbone, path: str | Path) -> None:
    """Write config, weights and the text table to one file (``torch.save``)."""
    torch.save({"config": backbone.config.to_dict(), "state_dict": backbone.state_dict()}, path)


def load_backbone(path: str | Path) -> SASRecBackbone:
    """Rebuild a backbone saved by ``save_backbone`` (on CPU, in eval mode)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = SASRecConfig.from_dict(saved["config"])
    backbone = SASRecBackbone(config, saved["state_dict"].get("text_embeddings"))
    backbone.load_state_dict(saved["state_dict"])
    return backbone.eval()
