"""SASRec, the sequential network: its config, per-event input features (event types and
rating buckets), the backbone (items = ID embedding + projected text embedding, optional
item bias) and saving/loading it. How it is trained is in ``rec_models.models.training``;
the design is described in docs/models.md."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from rec_models.data.schema import EVENT_TYPE_INDEX, EVENT_TYPES

VAL_K = 10
MONITOR = f"val_ndcg@{VAL_K}"
HYBRID_MONITOR = f"val_hybrid_ndcg@{VAL_K}"
"""Monitored instead of ``MONITOR`` when training with ``blend_with``: the best blend's NDCG."""
DEFAULT_ALPHAS = tuple(float(a) for a in np.round(np.linspace(0.0, 1.0, 11), 2))
DEFAULT_EVENT_TYPE = EVENT_TYPE_INDEX["click"]
"""Event type assumed for history items when the caller gives none."""
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
    # where training runs: Lightning's Trainer arguments (see rec_models.models.distributed)
    accelerator: str = "cpu"  # "cpu", "gpu", "auto", ...
    devices: int | str = 1  # processes per node with DDP; batch_size stays the global batch
    strategy: str = "auto"  # "ddp_spawn" for several devices ("auto" picks it); "ddp" only under torchrun
    num_nodes: int = 1
    loader_workers: int = 0  # > 0: training windows streamed from Parquet by this many processes (data_module)

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


class SASRecBackbone(nn.Module):
    """The SASRec network (plain ``nn.Module``; Lightning only wraps it for training)."""

    def __init__(self, config: SASRecConfig, text_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)  # own copy: grow() updates n_items
        d = config.d_model
        self.id_embedding = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        if config.text_dim:
            self._check_text(text_embeddings, config.n_items)
            # Shared, not copied (150 MB at 100k items, once per network and loaded model):
            # the table is an input, never written in place (see _load_from_state_dict).
            self.register_buffer("text_embeddings", text_embeddings.detach().float())
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
        # (item representations, the output table output_layer makes of them and the biases)
        self._frozen_items: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Loading a state takes its text table instead of writing it into ours, which may be
        # shared with the caller and other backbones.
        text = state_dict.get(prefix + "text_embeddings")
        if self.text_projection is not None and text is not None:
            self._check_text(text, self.config.n_items)
            self.text_embeddings = text.detach().to(self.id_embedding.weight.device, torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def freeze_item_table(self) -> None:
        """Compute the item representations and biases once and reuse them in eval mode
        (serving: the weights no longer change). ``grow`` or training forgets them."""
        with torch.no_grad():
            reps = self.item_representations().detach()
            biases = None if self.item_bias is None else self.item_biases().detach()
            # the output table too: output_layer's concatenation of the biases was ~40 % of
            # scoring a batch at 100k items (the logits are the same)
            outputs = reps if biases is None else self._output_table(reps, biases)
            self._frozen_items = (reps, outputs)

    def thaw_item_table(self) -> None:
        """Forget a frozen item table (the weights are about to change, or changed)."""
        self._frozen_items = None

    @contextlib.contextmanager
    def item_table_frozen(self) -> Iterator[SASRecBackbone]:
        """Within: eval-mode scoring computes the item table once, not per batch (a validation
        or an evaluation pass; the weights must not change meanwhile). At 100k items the table
        (a projection of every item's text) cost as much as scoring a batch of users."""
        previous = self._frozen_items
        self.freeze_item_table()
        try:
            yield self
        finally:
            self._frozen_items = previous

    def _check_text(self, text_embeddings: torch.Tensor | None, n_items: int) -> None:
        expected = (n_items + 1, self.config.text_dim)
        if text_embeddings is None or tuple(text_embeddings.shape) != expected:
            shape = None if text_embeddings is None else tuple(text_embeddings.shape)
            raise ValueError(f"text_embeddings must have shape {expected}, got {shape}")

    def item_representations(self, drop_ids: torch.Tensor | None = None,
                             rows: torch.Tensor | None = None) -> torch.Tensor:
        """[n_items + 1, d]: ID embedding + projected text embedding (row 0 = padding); only
        the items ``rows`` ([R] indices) when given.

        Items marked in ``drop_ids`` (bool [n_items + 1]) are represented by their text alone,
        as if never seen in training (ID dropout).
        """
        reps = self.id_embedding.weight if rows is None else self.id_embedding(rows)
        if drop_ids is not None:
            reps = reps * ~(drop_ids if rows is None else drop_ids[rows])[:, None]
        if self.text_projection is not None:
            reps = reps + self.text_projection(self.text_embeddings if rows is None else self.text_embeddings[rows])
        return reps

    def item_biases(self, drop_ids: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """[n_items + 1] score offsets (or those of ``rows``): learned per-item bias (not for
        ``drop_ids``) + the text part; None without ``item_bias``."""
        if self.item_bias is None:
            return None
        bias = self.item_bias if rows is None else self.item_bias[rows]
        if drop_ids is not None:
            bias = bias * ~(drop_ids if rows is None else drop_ids[rows])
        if self.text_bias is not None:
            bias = bias + self.text_bias(self.text_embeddings if rows is None else self.text_embeddings[rows]).squeeze(1)
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
        return self._with_bias_column(hidden), self._output_table(item_reps, item_biases)

    def _with_bias_column(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [..., d] with the constant-1 column that multiplies the item biases
        (unchanged without ``item_bias``)."""
        if self.item_bias is None:
            return hidden
        ones = torch.ones(*hidden.shape[:-1], 1, dtype=hidden.dtype, device=hidden.device)
        return torch.cat([hidden, ones], dim=-1)

    @staticmethod
    def _output_table(item_reps: torch.Tensor, item_biases: torch.Tensor) -> torch.Tensor:
        return torch.cat([item_reps, item_biases[:, None]], dim=1)

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
        if frozen is None:
            item_reps = self.item_representations()
            hidden, outputs = self.output_layer(self.forward(items, event_types, item_reps)[:, -1], item_reps)
        else:
            item_reps, outputs = frozen
            hidden = self._with_bias_column(self.forward(items, event_types, item_reps)[:, -1])
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
            self.text_embeddings = new_text_embeddings.detach().float().to(old.device)  # shared, as in __init__
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


def save_backbone(backbone: SASRecBackbone, path: str | Path, text_saved_in: str | None = None) -> None:
    """Write config, weights and the text table to one file (``torch.save``). ``text_saved_in``
    names the file that holds this backbone's text table already (another network of the same
    model): the table is then left out (150 MB at 100k items) and ``load_backbone`` takes it back."""
    state = backbone.state_dict()
    extra = {}
    if text_saved_in is not None and "text_embeddings" in state:
        state.pop("text_embeddings")
        extra["text_saved_in"] = text_saved_in
    torch.save({"config": backbone.config.to_dict(), "state_dict": state, **extra}, path)


def load_backbone(path: str | Path, text_embeddings: torch.Tensor | None = None) -> SASRecBackbone:
    """Rebuild a backbone saved by ``save_backbone`` (on CPU, in eval mode). A file saved without
    its text table (``text_saved_in``) needs ``text_embeddings``: that file's table, shared."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = SASRecConfig.from_dict(saved["config"])
    state = saved["state_dict"]
    if "text_saved_in" in saved:
        if text_embeddings is None:
            raise ValueError(f"{path} has no text table: pass the one of {saved['text_saved_in']}")
        state["text_embeddings"] = text_embeddings
    backbone = SASRecBackbone(config, state.get("text_embeddings"))
    backbone.load_state_dict(state)
    return backbone.eval()
