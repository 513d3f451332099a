"""The one training entry point: ``RecommenderConfig`` in, a trained ``HybridRecommender`` out.

The pipeline's ``candidate_model`` (full and micro-batch), ``recsys evaluate`` and every
benchmark call ``train_recommender``; the served pyfunc loads what ``HybridRecommender.save``
wrote and scores with the same ``score``/``ranker`` code, so what is measured offline is what
is promoted and served: SASRec networks (averaged over seeds) blended with the content model
and EASE on standardised scores, optionally MMR-re-ranked for diversity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rec_models.data import LeaveLastOutSplit
from rec_models.evaluation import RankingMetrics, eval_batch_size, stratified_user_sample
from rec_models.models.baselines import (
    DEFAULT_CONTENT_WINDOWS,
    DEFAULT_EASE_LAMBDAS,
    EASE,
    ContentRecommender,
    tune_content,
    tune_ease,
)
from rec_models.models.hybrid import CachedScores, blend, standardize_scores, standardized_scores
from rec_models.models.rerank import MMRReranker
from rec_models.models.sasrec import (
    DEFAULT_ALPHAS,
    SASRecBackbone,
    SASRecConfig,
    load_backbone,
    save_backbone,
)
from rec_models.models.training import train_sasrec, training_counts

CONFIG_FILE = "recommender.json"
BACKBONE_FILE = "backbone.pt"
COUNTS_FILE = "item_counts.npy"
EASE_FILE = "ease.pt"


@dataclass
class RecommenderConfig:
    """Every setting of the recommender; defaults are the model ``recsys evaluate`` calls
    ``main`` and the pipeline promotes. Saved with the model and logged to MLflow."""

    # SASRec architecture and training (see SASRecConfig)
    d_model: int = 64
    n_heads: int = 2
    n_layers: int = 2
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 64
    loss: str = "sampled"
    n_negatives: int = 1024
    max_epochs: int = 35
    patience: int = 15
    seed: int = 0
    rating_features: bool = True
    item_bias: bool = True
    id_init: str = "svd"
    id_dropout: float = 0.0
    freeze_ids: bool = False
    # where SASRec trains (Lightning Trainer arguments, see SASRecConfig and models.distributed):
    # e.g. accelerator="gpu", devices=4, strategy="ddp_spawn"; batch_size stays the global batch
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    # > 0: a full retrain's training windows are streamed from a Parquet file of the training
    # sequences by this many DataLoader worker processes (rec_models.models.windows), not held in memory;
    # the workers start from a fork server, so a script that trains must guard itself with
    # ``if __name__ == "__main__":`` (as for any spawned process; Dagster's entry points do)
    loader_workers: int = 0
    sasrec_models: int = 2  # SASRec networks trained with seeds seed, seed + 1, ...; their scores are averaged
    # validation (epochs, blend weights) scores at most this many users, a seeded sample stratified
    # by activity beyond it (0: all), so a fine-tune's validation does not grow with the user count
    val_users: int = 5000
    # hybrid with the content model (text similarity to the user's recent items)
    blend: bool = True
    content_windows: tuple[int, ...] = DEFAULT_CONTENT_WINDOWS
    content_decay: float = 0.9
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    # ... and with EASE (collaborative, closed form): ease_weight * EASE + (1 - weight) * the above
    ease: bool = True
    ease_lambdas: tuple[float, ...] = DEFAULT_EASE_LAMBDAS
    ease_weights: tuple[float, ...] = DEFAULT_ALPHAS
    # diversity re-ranking (MMR over text embeddings): the served default, 0 = off
    diversity: float = 0.0
    mmr_candidates: int = 100
    # users without history: standardised text similarity (context) vs popularity
    cold_text_weight: float = 0.5
    # micro-batch fine-tunes of the champion
    finetune_max_epochs: int = 4
    finetune_patience: int = 3
    finetune_lr: float = 3e-4
    finetune_val_users: int = 500  # a fine-tune validates on at most this and val_users (0: no limit)
    # safety net only: a run that hits it says so (history["stopped_by"] == "max_time")
    max_time_s: float | None = 1800.0

    def __post_init__(self) -> None:
        self.content_windows = tuple(int(w) for w in self.content_windows)
        self.alphas = tuple(float(a) for a in self.alphas)
        self.ease_lambdas = tuple(float(x) for x in self.ease_lambdas)
        self.ease_weights = tuple(float(w) for w in self.ease_weights)
        if not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"diversity must be in [0, 1], got {self.diversity}")
        if not 0.0 <= self.cold_text_weight <= 1.0:
            raise ValueError(f"cold_text_weight must be in [0, 1], got {self.cold_text_weight}")

    def sasrec(self, n_items: int, text_dim: int, finetune: bool = False) -> SASRecConfig:
        """The SASRec part of this config for a catalog of ``n_items``."""
        if self.sasrec_models < 1:
            raise ValueError(f"sasrec_models must be at least 1, got {self.sasrec_models}")
        names = {f.name for f in dataclasses.fields(SASRecConfig)} - {"n_items", "text_dim"}
        values = {name: getattr(self, name) for name in names}
        if finetune:
            # a fine-tune's few users' windows are built in memory (no file, no worker start-up)
            values.update(max_epochs=self.finetune_max_epochs, patience=self.finetune_patience, lr=self.finetune_lr,
                          loader_workers=0)
        return SASRecConfig(n_items=n_items, text_dim=text_dim, **values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RecommenderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recommender settings {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class HybridRecommender:
    """A trained scorer: ``ease_weight * EASE + (1 - ease_weight) * (alpha * SASRec + (1 -
    alpha) * content)``, every part standardised per user (``sasrec.standardize_scores``).

    ``item_counts`` (int64 [n_items + 1]) are the training interactions per item: items with
    none are "unseen", where the content score stands in for SASRec's (``sasrec.blend``), and
    the counts are the popularity that users without history fall back on. Score functions
    follow ``rec_models.evaluation``: ``(histories, event_types) -> [B, n_items + 1]``.
    """

    backbone: SASRecBackbone
    config: RecommenderConfig
    alpha: float
    content_window: int
    item_counts: np.ndarray
    ease: EASE | None = None
    ease_weight: float = 0.0
    details: dict = field(default_factory=dict)
    more_backbones: list[SASRecBackbone] = field(default_factory=list)  # the ensemble's other seeds

    def __post_init__(self) -> None:
        self.item_counts = np.asarray(self.item_counts, dtype=np.int64)
        self._content: ContentRecommender | None = None
        self._normalized_text: torch.Tensor | None = None
        self._shared_content: CachedScores | None = None  # see share_content_scores

    @property
    def unseen(self) -> torch.Tensor:
        return torch.from_numpy(self.item_counts == 0)

    @property
    def n_items(self) -> int:
        return self.backbone.config.n_items

    @property
    def text_embeddings(self) -> torch.Tensor | None:
        return self.backbone.text_embeddings if self.backbone.text_projection is not None else None

    def content(self) -> ContentRecommender | None:
        if self._content is None and self.text_embeddings is not None and self.content_window:
            self._content = ContentRecommender(self.text_embeddings, self.content_window, self.config.content_decay)
        return self._content

    def score(self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """Scores [B, n_items + 1] of the whole hybrid."""
        return self._with_ease(self.sequential_score(histories, event_types), histories)

    def sequential_score(
        self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None
    ) -> torch.Tensor:
        """SASRec blended with the content model (the SASRec logits alone without a blend)."""
        own = self.sasrec_score(histories, event_types)
        content = self.content()
        if not self.config.blend or content is None:
            return own
        second = standardized_scores(self._shared_content or content.score, histories, event_types)
        if self.alpha == 0.0:
            return second
        return blend(standardize_scores(own), second, self.alpha, self.unseen)

    @property
    def backbones(self) -> list[SASRecBackbone]:
        return [self.backbone, *self.more_backbones]

    def sasrec_score(self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None):
        """The SASRec logits, or with several networks the mean of their standardised scores."""
        if not self.more_backbones:
            return self.backbone.score_histories(histories, event_types)
        total = standardize_scores(self.backbone.score_histories(histories, event_types))
        for backbone in self.more_backbones:  # in place: at 100k items each [B, n] copy counts
            total += standardize_scores(backbone.score_histories(histories, event_types))
        return total.div_(len(self.backbones))

    def freeze(self) -> None:
        """Compute every network's item table once (serving: the weights no longer change)."""
        for backbone in self.backbones:
            backbone.freeze_item_table()

    @contextlib.contextmanager
    def item_tables_frozen(self) -> Iterator[HybridRecommender]:
        """Within: every network computes its item table once (an evaluation pass)."""
        with contextlib.ExitStack() as stack:
            for backbone in self.backbones:
                stack.enter_context(backbone.item_table_frozen())
            yield self

    def same_content(self, other: HybridRecommender) -> bool:
        """Whether ``other`` blends in the very same content model: window, decay and text table."""
        mine, theirs = self.content(), other.content()
        return (mine is not None and theirs is not None and self.config.blend and other.config.blend
                and (mine.window, mine.decay) == (theirs.window, theirs.decay)
                and (mine.embeddings is theirs.embeddings or torch.equal(mine.embeddings, theirs.embeddings)))

    def _with_ease(self, sequential: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
        if self.ease is None or self.ease_weight == 0.0:
            return sequential
        # EASE cannot score items without training interactions: there the rest stands in.
        return blend(standardize_scores(self.ease.score(histories)), standardize_scores(sequential),
                     self.ease_weight, self.unseen)

    def ranker(self, diversity: float | None = None, k: int = 10) -> Callable:
        """The score function whose top ``k`` is what serving answers: ``score``, MMR-re-ranked
        when ``diversity`` (default: the config's) is above 0."""
        diversity = self.config.diversity if diversity is None else diversity
        if diversity <= 0.0 or self.text_embeddings is None:
            return self.score
        candidates = max(self.config.mmr_candidates, k)
        return MMRReranker(self.text_embeddings, diversity=diversity, k=k, n_candidates=candidates).wrap(self.score)

    def cold_scores(self, context: torch.Tensor | np.ndarray | None, n_rows: int) -> torch.Tensor:
        """Scores [n_rows, n_items + 1] for users without history: the training counts
        (popularity), or with ``context`` vectors [n_rows, text_dim] (a user's stated
        interests or recent items, embedded by the text encoder) ``cold_text_weight *
        cosine + (1 - weight) * log-popularity``, both standardised."""
        counts = torch.from_numpy(self.item_counts.astype(np.float32))
        counts[0] = -math.inf
        if context is None or self.text_embeddings is None:
            return counts.expand(n_rows, -1).clone()
        if self._normalized_text is None:
            self._normalized_text = F.normalize(self.text_embeddings.float(), dim=1)
        context = F.normalize(torch.as_tensor(context, dtype=torch.float32), dim=1)
        text = standardize_scores(context @ self._normalized_text.T)
        popular = standardize_scores(torch.log1p(counts.clamp(min=0)).expand(n_rows, -1))
        weight = self.config.cold_text_weight
        return weight * text + (1.0 - weight) * popular

    def grow(self, text_embeddings: torch.Tensor) -> None:
        """Extend to a larger catalog (``text_embeddings`` [n + 1, dim]); new items are unseen."""
        for backbone in self.backbones:
            backbone.grow(text_embeddings)
        if self.ease is not None:
            self.ease.grow(self.n_items)
        self.item_counts = np.pad(self.item_counts, (0, self.n_items + 1 - len(self.item_counts)))
        self._content = self._normalized_text = None

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        text = getattr(self.backbone, "text_embeddings", None)  # absent without a text side
        for index, backbone in enumerate(self.backbones):
            # the networks of one model read the same text table: written once, with the first
            other = getattr(backbone, "text_embeddings", None) if index else None
            shared = other is not None and text is not None and (other is text or torch.equal(other, text))
            save_backbone(backbone, path / (BACKBONE_FILE if index == 0 else f"backbone_{index}.pt"),
                          text_saved_in=BACKBONE_FILE if shared else None)
        np.save(path / COUNTS_FILE, self.item_counts)
        if self.ease is not None:
            torch.save(self.ease.state(), path / EASE_FILE)
        (path / CONFIG_FILE).write_text(json.dumps({
            "config": self.config.to_dict(), "alpha": self.alpha, "content_window": self.content_window,
            "ease_weight": self.ease_weight, "details": self.details,
        }, default=float))
        return path

    @classmethod
    def load(cls, path: Path | str) -> HybridRecommender:
        path = Path(path)
        backbone = load_backbone(path / BACKBONE_FILE)
        saved = json.loads((path / CONFIG_FILE).read_text())
        ease = None
        if (path / EASE_FILE).exists():
            ease = EASE.from_state(torch.load(path / EASE_FILE, map_location="cpu", weights_only=True))
        text = getattr(backbone, "text_embeddings", None)
        more = [load_backbone(p, text) for p in sorted(path.glob("backbone_*.pt"), key=lambda p: int(p.stem.split("_")[1]))]
        return cls(backbone, RecommenderConfig.from_dict(saved["config"]), float(saved["alpha"]),
                   int(saved["content_window"]), np.load(path / COUNTS_FILE), ease, float(saved["ease_weight"]),
                   saved.get("details", {}), more)


def train_recommender(
    split: LeaveLastOutSplit,
    text_embeddings: torch.Tensor,
    config: RecommenderConfig | None = None,
    init: HybridRecommender | None = None,
    users_subset: Sequence[int] | None = None,
    callbacks: Sequence = (),
    logger=None,
    progress: bool = False,
) -> tuple[HybridRecommender, dict]:
    """Train the recommender on ``split`` (early stopping on validation NDCG@10 of the blend).

    From scratch: the content window is tuned on validation, then SASRec is trained with
    alpha chosen together with the epoch. With ``init`` (the champion, already grown to this
    catalog) it is a fine-tune on ``users_subset``: the champion's content window and alpha
    are kept and the returned model is never worse on validation than ``init``.
    Returns the model and the training history of ``sasrec.train_sasrec``.
    """
    config = config or (init.config if init is not None else RecommenderConfig())
    n_items = len(text_embeddings) - 1
    text_dim = text_embeddings.shape[1]
    content, window_val, alphas = None, {}, config.alphas
    limits = (config.finetune_val_users, config.val_users) if init is not None else (config.val_users,)
    val_split = user_sample(split, min(filter(None, limits), default=0), config.seed)  # what validation scores
    if config.blend and text_dim:
        if init is not None:
            content = ContentRecommender(text_embeddings, init.content_window, config.content_decay)
            alphas = (init.alpha,)
        else:
            content, window_val = tune_content(val_split, text_embeddings, config.content_windows, config.content_decay)
    partner = None if content is None else CachedScores(content.score, standardized=True)  # same users every validation
    networks, histories = [], []
    for index in range(config.sasrec_models):
        sasrec_config = dataclasses.replace(config.sasrec(n_items, text_dim, finetune=init is not None),
                                            seed=config.seed + index)
        start = None if init is None else init.backbones[min(index, len(init.backbones) - 1)]
        network, network_history = train_sasrec(
            split, sasrec_config, text_embeddings if text_dim else None, init_backbone=start,
            max_time_s=config.max_time_s, logger=logger, callbacks=callbacks, users_subset=users_subset, val_split=val_split,
            progress=progress, blend_with=partner, alphas=alphas,
        )
        networks.append(network)
        histories.append(network_history)
    history = dict(histories[0])
    history["networks"] = [{k: h[k] for k in ("stopped_by", "best_val_ndcg@10", "train_s", "loader_workers")} | {"epochs": len(h["epochs"])}
                           for h in histories]
    history["train_s"] = sum(h["train_s"] for h in histories)
    history["val_users"] = len(val_split.train)
    if any(h["stopped_by"] == "max_time" for h in histories):
        history["stopped_by"] = "max_time"
    details = {"content_window_val_ndcg@10": {str(k): v for k, v in window_val.items()},
               "networks": history["networks"]}
    model = HybridRecommender(networks[0], config, float(history.get("best_alpha", 1.0)),
                              content.window if content else 0, training_counts(split, n_items), details=details,
                              more_backbones=networks[1:])
    weights = (0.0,)
    if config.ease:
        if init is not None and init.ease is not None:  # refit on today's data, keep the champion's settings
            ease, weights = EASE(init.ease.lam).fit(split.train, n_items), (init.ease_weight,)
        else:
            ease, lambda_val = tune_ease(split, n_items, config.ease_lambdas)
            weights, details["ease_lambda_val_ndcg@10"] = config.ease_weights, {str(k): v for k, v in lambda_val.items()}
        model.ease = EASE.from_state(ease.state())  # score in float32, exactly as when loaded for serving
    # One network: alpha was chosen with its epoch. An ensemble (or EASE) is blended afterwards,
    # every (alpha, weight) on the same validation scores; a fine-tune keeps the champion's.
    blend_alphas = alphas if (len(networks) > 1 and content is not None) else (model.alpha,)
    grid = _tune_blend(model, val_split, blend_alphas, weights, partner)
    model.alpha, model.ease_weight = max(sorted(grid), key=lambda key: grid[key])  # ties: smaller alpha, weight
    details["blend_val_ndcg@10"] = {f"{a}/{w}": v for (a, w), v in grid.items()}
    history["best_alpha"], history["best_ease_weight"] = model.alpha, model.ease_weight
    history["best_val_hybrid_ndcg@10"] = grid[(model.alpha, model.ease_weight)]
    return model, history


@contextlib.contextmanager
def share_content_scores(models: Sequence[HybridRecommender]) -> Iterator[None]:
    """Within: models that blend in the same content model (``same_content``: the gate's
    candidate, a fine-tune of the champion, and the champion grown to today's catalog) compute
    its scores once per user batch, provided they score each batch in turn (its latest scores are
    kept). At 100k items the content model is the costliest part of scoring: cosine similarity
    over 384-dimensional text for every item, 3x the FLOPs of a SASRec network."""
    try:
        for index, model in enumerate(models):
            first = next(m for m in models[: index + 1] if m is model or m.same_content(model))
            if first is model:
                content = model.content()
                model._shared_content = None if content is None else CachedScores(content.score, standardized=True,
                                                                                  latest_only=True)
            else:
                model._shared_content = first._shared_content
        yield
    finally:
        for model in models:
            model._shared_content = None


def user_sample(split: LeaveLastOutSplit, users: int, seed: int) -> LeaveLastOutSplit:
    """The users a validation or an evaluation scores: all of ``split``, or (``users`` > 0 and
    more users than that) a seeded sample of ``users`` stratified by history length."""
    if users <= 0 or len(split.train) <= users:
        return split
    lengths = np.fromiter((len(h) for h in split.train.items), dtype=np.int64, count=len(split.train))
    return split.subset(stratified_user_sample(lengths, users, seed))


def _tune_blend(model: HybridRecommender, split: LeaveLastOutSplit, alphas: Sequence[float],
                weights: Sequence[float], content_score: Callable | None = None) -> dict[tuple[float, float], float]:
    """Validation NDCG@10 of the model for each (content alpha, EASE weight), all on the same
    scores, composed exactly as ``HybridRecommender.score`` does (``content_score``: the content
    model's scores, if already at hand)."""
    metrics = {(float(a), float(w)): RankingMetrics(model.n_items, 10) for a in alphas for w in weights}
    val, unseen, content = split.val_histories(), model.unseen, model.content()
    size = eval_batch_size(model.n_items)
    with model.item_tables_frozen():
        for start in range(0, len(val), size):
            batch, types = val.items[start : start + size], val.event_types[start : start + size]
            targets = split.val_targets[start : start + size]
            own = model.sasrec_score(batch, types)
            second = (standardized_scores(content_score or content.score, batch, types) if model.config.blend and content
                      else None)
            ease = standardize_scores(model.ease.score(batch)) if model.ease is not None else None
            for alpha in sorted({a for a, _ in metrics}):
                if second is None:
                    sequential = own
                else:
                    sequential = second if alpha == 0.0 else blend(standardize_scores(own), second, alpha, unseen)
                for (a, weight), metric in metrics.items():
                    if a != alpha:
                        continue
                    scores = sequential if ease is None or weight == 0.0 else blend(ease, standardize_scores(sequential),
                                                                                     weight, unseen)
                    metric.update(scores, batch, targets)
    return {key: metric.compute()["ndcg@10"] for key, metric in metrics.items()}
