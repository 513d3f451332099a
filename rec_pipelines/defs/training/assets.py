"""Training data and the Lightning-trained sequential recommender (full or micro-batch)."""


import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import torch

from rec_models.data import (
    ItemVocab,
    LeaveLastOutSplit,
    UserSequences,
    collapse_repeats,
    interactions,
    leave_last_out,
)
from rec_models.evaluation import protocol_sequences
from rec_models.features import FeedbackFeatures
from rec_models.files import write_json_atomic
from rec_models.privacy import key_id
from rec_models.recommender import HybridRecommender, RecommenderConfig, train_recommender
from rec_models.sasrec import event_features
from rec_models.serving import example_request, write_bundle
from rec_pipelines.plots import figure_to_md, new_figure
from rec_pipelines.registry import MlflowEpochMetrics, ModelRegistry
from rec_pipelines.resources import LakeResource, MlflowResource, TextEncoderResource

GROUP = "training"
RETRAIN_TAG = "recsys/model"  # dagster.yaml limits runs per value of this tag to one
# Runs started any other way (e.g. "Materialize" in the UI) still train one at a time: this
# concurrency pool has dagster.yaml's default pool limit of 1.
TRAINING_POOL = "recsys_training"


@dataclass
class TrainingData:
    """Everything training and evaluation share, in vocab indices."""

    vocab: ItemVocab
    sequences: UserSequences  # every user's full history (serving uses it)
    split: LeaveLastOutSplit  # protocol split of users with >= 5 interactions
    user_batches: dict[str, list[str]]  # batch ids each user has events in
    batches: list[str]  # every batch id present, in ingestion order


def text_matrix(vocab: ItemVocab, embeddings: pd.DataFrame) -> torch.Tensor:
    """[n_items + 1, dim] text vectors in vocab order; row 0 (padding) and items without
    catalog text are zeros."""
    vectors = np.stack(embeddings["embedding"].to_numpy()) if len(embeddings) else np.zeros((0, 1), np.float32)
    matrix = np.zeros((len(vocab) + 1, vectors.shape[1]), dtype=np.float32)
    rows = vocab.index(embeddings["item_id"].astype(str), unknown=0)
    matrix[rows[rows > 0]] = vectors[rows > 0]
    return torch.from_numpy(matrix)


class TrainingDataConfig(dg.Config):
    exclude_bots: bool = True  # users flagged bot-like by feedback_features stay out of training and evaluation


@dg.asset(group_name=GROUP, kinds={"pandas"})
def training_data(
    context: dg.AssetExecutionContext,
    config: TrainingDataConfig,
    lake: LakeResource,
    validated_feedback: pd.DataFrame,
    item_catalog: pd.DataFrame,
    feedback_features: FeedbackFeatures,
) -> dg.Output[TrainingData]:
    """User sequences and the leave-last-out split under the evaluation protocol (every rating
    row kept, its value as a feature; stable time order). The item vocabulary is append-only and
    kept in the lake, so any earlier model's tables are a prefix of today's and can grow."""
    vocab_path = lake.store().lake / "item_vocab.json"
    vocab = ItemVocab.from_dict(json.loads(vocab_path.read_text())) if vocab_path.exists() else ItemVocab()
    added = vocab.extend(item_catalog["item_id"].astype(str))
    positives = collapse_repeats(interactions(validated_feedback, min_rating=None))
    bots = set(feedback_features.users.loc[feedback_features.users["bot_like"], "user_id"].astype(str))
    is_bot = positives["user_id"].astype(str).isin(bots) if config.exclude_bots else np.zeros(len(positives), bool)
    positives = positives[~np.asarray(is_bot)]
    # extends vocab with items seen only in feedback
    sequences = protocol_sequences(positives, vocab, event_features)
    write_json_atomic(vocab_path, vocab.to_dict())

    split = leave_last_out(sequences)
    user_batches = positives.groupby("user_id", sort=False)["batch_id"].unique().map(list).to_dict()
    batches = list(dict.fromkeys(validated_feedback["batch_id"].astype(str)))
    lengths = np.array([len(s) for s in sequences.items]) if len(sequences) else np.zeros(1)
    return dg.Output(
        TrainingData(vocab, sequences, split, {str(k): v for k, v in user_batches.items()}, batches),
        metadata={
            "items": len(vocab),
            "new_items_in_vocab": added,
            "users": len(sequences),
            "users_in_split": len(split.train),
            "interactions": len(positives),
            "bot_users_excluded": len(bots) if config.exclude_bots else 0,
            "bot_interactions_excluded": int(np.sum(is_bot)),
            "median_sequence_length": float(np.median(lengths)),
            "batches": len(batches),
        },
    )


_DEFAULTS = RecommenderConfig()
FINETUNE_SETTINGS = ("finetune_max_epochs", "finetune_patience", "finetune_lr", "max_time_s", "diversity")


class TrainConfig(dg.Config):
    """How ``candidate_model`` trains. Model settings default to ``RecommenderConfig``'s (the
    model ``recsys evaluate`` reports as ``main``); ``model`` overrides any of them by name."""

    mode: str = "auto"  # "full", "incremental", or "auto" (incremental when a champion exists)
    replay_users: int = 300  # micro-batch: users without new feedback replayed so the model does not forget them
    max_epochs: int = _DEFAULTS.max_epochs
    patience: int = _DEFAULTS.patience  # epochs without a better validation NDCG@10 before stopping
    finetune_max_epochs: int = _DEFAULTS.finetune_max_epochs
    d_model: int = _DEFAULTS.d_model
    max_len: int = _DEFAULTS.max_len
    diversity: float = _DEFAULTS.diversity  # served MMR diversity default (0 = off); requests may override
    seed: int = _DEFAULTS.seed
    max_time_s: float = _DEFAULTS.max_time_s  # safety net only; a run that hits it says so
    model: dict[str, Any] = {}  # any other RecommenderConfig field, e.g. {"ease": false}
    bundle_text_encoder: bool = False  # ship the text encoder in the model so requests may send context_text

    def recommender_config(self) -> RecommenderConfig:
        typed = {name: getattr(self, name) for name in (
            "max_epochs", "patience", "finetune_max_epochs", "d_model", "max_len", "diversity", "seed", "max_time_s")}
        try:
            return RecommenderConfig.from_dict({**typed, **self.model})
        except (TypeError, ValueError) as error:
            raise dg.Failure(f"invalid model settings: {error}") from error


@dataclass
class TrainedModel:
    run_id: str
    model_uri: str
    bundle_dir: str
    mode: str
    parent_version: str | None
    batches: list[str]
    new_batches: list[str]
    history: dict


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL)
def candidate_model(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    training_data: TrainingData,
    item_text_embeddings: pd.DataFrame,
    user_context_embeddings: pd.DataFrame,
    item_catalog: pd.DataFrame,
    lake: LakeResource,
    mlflow: MlflowResource,
    text_encoder: TextEncoderResource,
) -> dg.Output[TrainedModel]:
    """The recommender of ``rec_models.recommender`` (SASRec blended with the content model and
    EASE), trained by ``train_recommender``. ``incremental`` fine-tunes the champion on users
    with new feedback plus a replay sample; ``full`` trains from scratch. Logged to MLflow as a
    pyfunc model that carries its code."""
    import mlflow as mlf

    registry: ModelRegistry = mlflow.registry()
    data = training_data
    text = text_matrix(data.vocab, item_text_embeddings)
    model_config = config.recommender_config()
    champion = registry.version_by_alias("champion")
    mode = config.mode
    if mode not in ("auto", "full", "incremental"):
        raise dg.Failure(f"mode must be auto, full or incremental, got {mode!r}")
    if mode == "auto":
        mode = "incremental" if champion is not None else "full"
    if mode == "incremental" and champion is None:
        context.log.warning("no champion to fine-tune from: running a full retrain instead")
        mode = "full"

    init, users_subset, consumed = None, None, []
    if mode == "incremental":
        bundle = registry.download_bundle("champion", dst=Path(tempfile.mkdtemp(prefix="champion-")))
        try:
            init = HybridRecommender.load(bundle)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            context.log.warning(f"champion v{champion.version} cannot be fine-tuned ({error}): full retrain instead")
            mode = "full"
    if mode == "incremental":
        consumed = json.loads(champion.tags.get("batches", "[]"))
        init.grow(text)
        # A fine-tune keeps the champion's model settings; how long it trains comes from this run.
        model_config = dataclasses.replace(init.config, **{name: getattr(model_config, name) for name in FINETUNE_SETTINGS})
        users_subset = _microbatch_users(data, set(consumed), config.replay_users, model_config.seed)
        context.log.info(f"micro-batch: fine-tuning champion v{champion.version} on {len(users_subset)} users")
    new_batches = [b for b in data.batches if b not in set(consumed)]

    with registry.start_run(
        run_name=f"{mode}-{context.run_id[:8]}",
        tags={"dagster.run_id": context.run_id, "mode": mode, "parent_version": champion.version if champion else ""},
    ) as run:
        mlf.log_params({**model_config.to_dict(), "mode": mode, "users": len(data.split.train),
                        "train_users": len(users_subset) if users_subset is not None else len(data.split.train),
                        "new_batches": len(new_batches)})
        mlf.log_dict(model_config.to_dict(), "recommender_config.json")
        model, history = train_recommender(
            data.split, text, model_config, init=init, users_subset=users_subset, callbacks=[MlflowEpochMetrics()],
        )
        mlf.log_metrics({"train_s": history["train_s"], "sequences_per_s": history["sequences_per_s"],
                         "alpha": model.alpha, "ease_weight": model.ease_weight,
                         "hit_time_limit": float(history["stopped_by"] == "max_time")})
        mlf.set_tag("stopped_by", history["stopped_by"])
        if history["stopped_by"] == "max_time":
            context.log.warning(f"training hit the {model_config.max_time_s}s safety limit: accuracy depends on machine speed")
        curves = training_curves_figure(history, mode)
        mlf.log_figure(curves, "plots/training_curves.png")
        mlf.log_dict({"batches": data.batches, "new_batches": new_batches}, "batches.json")

        store = lake.store()
        bundle_dir = store.lake / "models" / run.info.run_id / "bundle"
        titles = item_catalog.set_index("item_id")["title"]
        histories = dict(zip(data.sequences.user_ids, zip(data.sequences.items, data.sequences.event_types)))
        contexts = user_context_embeddings[~user_context_embeddings["user_id"].astype(str).isin(histories)]
        write_bundle(bundle_dir, model, data.vocab, titles, histories, pseudonym_key_id=key_id(store.pseudonym_key()),
                     user_contexts=contexts,
                     text_encoder_dir=text_encoder.encoder().model_path if config.bundle_text_encoder else None)
        example_users = data.sequences.user_ids[:2]
        info = registry.log_recommender(bundle_dir, example_request(example_users, data.vocab.ids[:2]))

    context.log.info(f"trained {mode} model in {history['train_s']:.1f}s (stopped by {history['stopped_by']}); "
                     f"MLflow run {run.info.run_id}")
    return dg.Output(
        TrainedModel(run.info.run_id, info.model_uri, str(bundle_dir), mode,
                     champion.version if champion else None, data.batches, new_batches, history),
        metadata={
            "mode": mode,
            "mlflow_run_id": run.info.run_id,
            "model_uri": info.model_uri,
            "parent_version": champion.version if champion else "none",
            "epochs": len(history["epochs"]),
            "stopped_by": history["stopped_by"],
            "alpha": model.alpha,
            "ease_weight": model.ease_weight,
            "best_val_ndcg@10": float(history["best_val_ndcg@10"]),
            "best_val_hybrid_ndcg@10": float(history.get("best_val_hybrid_ndcg@10", float("nan"))),
            "warm_start_val_ndcg@10": float(history["warm_start_val_ndcg@10"] or float("nan")),
            "train_s": float(history["train_s"]),
            "sequences_per_s": float(history["sequences_per_s"]),
            "new_batches": dg.MetadataValue.json(new_batches),
            "config": dg.MetadataValue.json(model_config.to_dict()),
            "training_curves": dg.MetadataValue.md(figure_to_md(curves, alt="training curves")),
        },
    )


def training_curves_figure(history: dict, mode: str):
    """Validation NDCG@10 and training loss per epoch (the warm start as epoch -1)."""
    figure = new_figure(6.0, 3.5)
    ndcg_axis = figure.add_subplot(1, 1, 1)
    epochs = history["epochs"]
    x = [e["epoch"] for e in epochs]
    ndcg_axis.plot(x, [e.get("val_ndcg@10", np.nan) for e in epochs], "o-", color="tab:blue", label="val NDCG@10")
    if history.get("warm_start_val_ndcg@10") is not None:
        ndcg_axis.axhline(history["warm_start_val_ndcg@10"], color="tab:gray", ls="--", label="champion (warm start)")
    ndcg_axis.set_xlabel("epoch")
    ndcg_axis.set_ylabel("val NDCG@10", color="tab:blue")
    loss_axis = ndcg_axis.twinx()
    loss_axis.plot(x, [e.get("train_loss", np.nan) for e in epochs], "s-", color="tab:orange", label="train loss")
    loss_axis.set_ylabel("train loss", color="tab:orange")
    ndcg_axis.set_title(f"{mode} training")
    ndcg_axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def _microbatch_users(data: TrainingData, consumed: set[str], replay: int, seed: int) -> np.ndarray:
    """Positions (in the split) of users with feedback the champion has not seen, plus a
    random replay sample of the others so the model does not forget them."""
    fresh = np.array([i for i, uid in enumerate(data.split.train.user_ids)
                      if any(b not in consumed for b in data.user_batches.get(uid, []))], dtype=np.int64)
    others = np.setdiff1d(np.arange(len(data.split.train)), fresh)
    rng = np.random.default_rng(seed)
    sample = rng.choice(others, size=min(replay, len(others)), replace=False) if len(others) else others
    return np.sort(np.concatenate([fresh, sample]))
