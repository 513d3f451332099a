"""Training data and the candidate model (full or micro-batch): thin assets over
``rec_pipelines.training``."""

from typing import Any

import dagster as dg
import pandas as pd

from rec_models.data.features import FeedbackFeatures
from rec_models.data.privacy import key_id
from rec_models.models import RecommenderConfig
from rec_pipelines.defs.resources import (
    USER_TABLE_POOL,
    LakeResource,
    MlflowResource,
    TextEncoderResource,
    load_ref,
)
from rec_pipelines.item_embeddings import ItemEmbeddingsRef
from rec_pipelines.lake import BackgroundWrites, ValidatedEvents
from rec_pipelines.plots import figure_to_md
from rec_pipelines.training import (
    LOADED_DATA,
    TrainedModel,
    TrainingDataRef,
    TrainingRequest,
    assemble_training_data,
    text_matrix,
    train_candidate,
)
from rec_pipelines.user_table import update_user_table

GROUP = "training"
RETRAIN_TAG = "recsys/model"  # dagster.yaml limits runs per value of this tag to one
# Runs started any other way (e.g. "Materialize" in the UI) still train one at a time: this
# concurrency pool has dagster.yaml's default pool limit of 1.
TRAINING_POOL = "recsys_training"


class TrainingDataConfig(dg.Config):
    exclude_bots: bool = True  # users flagged bot-like by feedback_features stay out of training and evaluation


@dg.asset(group_name=GROUP, kinds={"pandas"}, pool=USER_TABLE_POOL)
def training_data(
    config: TrainingDataConfig,
    lake: LakeResource,
    validated_feedback: ValidatedEvents,
    item_catalog: pd.DataFrame,
    feedback_features: FeedbackFeatures,
) -> dg.Output[TrainingDataRef]:
    """User sequences and the leave-last-out split under the evaluation protocol (every rating
    row kept, its value as a feature; stable time order), bot-like users left out; the item
    vocabulary is append-only. The per-user table in the lake is updated with the new batches
    only: users without new events are not rebuilt (``rec_pipelines.user_table``). Bot-like
    users are those ``feedback_features`` flags plus those the table flags under its rule (each
    rebuilt user from all of their rows, kept with the table): a micro-batch need not refresh
    ``feedback_features`` (see ``automation``) to keep a new bot out, now or later.

    The output is a ``TrainingDataRef`` (the table's version, the vocabulary's path, the users
    left out), not a copy of the history: the steps after it ``load()`` the data."""
    lake_root = lake.store().lake
    table_path, vocab_path = lake_root / "tables" / "user_sequences.parquet", lake_root / "item_vocab.json"
    with BackgroundWrites() as writes:  # the table is stored while the sequences are built
        table, update, flagged = update_user_table(
            table_path, validated_feedback, feedback_features.flag_bots if config.exclude_bots else None, writes.submit)
        bots = feedback_features.bot_users() | flagged if config.exclude_bots else set()
        data, stats = assemble_training_data(table, item_catalog, vocab_path, bots)
    ref = TrainingDataRef(str(table_path), table.version, str(vocab_path), tuple(sorted(bots)), tuple(table.batches))
    LOADED_DATA.keep(ref, data)
    return dg.Output(ref, metadata={**stats, **update, "bot_users_flagged_in_table": len(flagged),
                                    "table_path": dg.MetadataValue.path(str(table_path)),
                                    "table_version": table.version or "none"})


_DEFAULTS = RecommenderConfig()


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
    # a full retrain streams its training windows from Parquet with this many loader processes (0: in memory)
    loader_workers: int = 1
    model: dict[str, Any] = {}  # any other RecommenderConfig field, e.g. {"ease": false}
    bundle_text_encoder: bool = False  # ship the text encoder in the model so requests may send context_text

    def recommender_config(self) -> RecommenderConfig:
        typed = {name: getattr(self, name) for name in (
            "max_epochs", "patience", "finetune_max_epochs", "d_model", "max_len", "diversity", "seed", "max_time_s",
            "loader_workers")}
        try:
            return RecommenderConfig.from_dict({**typed, **self.model})
        except (TypeError, ValueError) as error:
            raise dg.Failure(f"invalid model settings: {error}") from error


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL)
def candidate_model(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    training_data: TrainingDataRef,
    item_text_embeddings: ItemEmbeddingsRef,
    user_context_embeddings: pd.DataFrame,
    item_catalog: pd.DataFrame,
    lake: LakeResource,
    mlflow: MlflowResource,
    text_encoder: TextEncoderResource,
) -> dg.Output[TrainedModel]:
    """The recommender of ``rec_models.models.recommender`` (SASRec blended with the content model and
    EASE), trained by ``train_recommender``. ``incremental`` fine-tunes the champion on users
    with new feedback plus a replay sample; ``full`` trains from scratch. Logged to MLflow as a
    pyfunc model that carries its code."""
    request = TrainingRequest(
        mode=config.mode, config=config.recommender_config(), replay_users=config.replay_users,
        run_name=context.run_id[:8], run_tags={"dagster.run_id": context.run_id},
        bundle_text_encoder_dir=text_encoder.encoder().model_path if config.bundle_text_encoder else None)
    store = lake.store()
    data = load_ref(training_data)
    try:
        trained, model, curves = train_candidate(
            request, data, text_matrix(data.vocab, load_ref(item_text_embeddings)),
            item_catalog.set_index("item_id")["title"], user_context_embeddings, mlflow.registry(),
            store.work / "models", key_id(store.pseudonym_key()), context.log)
    except ValueError as error:  # a bad mode
        raise dg.Failure(str(error)) from error
    history, model_config = trained.history, model.config
    return dg.Output(
        trained,
        metadata={
            "mode": trained.mode,
            "mlflow_run_id": trained.run_id,
            "model_uri": trained.model_uri,
            "parent_version": trained.parent_version or "none",
            "epochs": len(history["epochs"]),
            "stopped_by": history["stopped_by"],
            "alpha": model.alpha,
            "ease_weight": model.ease_weight,
            "best_val_ndcg@10": float(history["best_val_ndcg@10"]),
            "best_val_hybrid_ndcg@10": float(history.get("best_val_hybrid_ndcg@10", float("nan"))),
            "warm_start_val_ndcg@10": float(history["warm_start_val_ndcg@10"] or float("nan")),
            "train_s": float(history["train_s"]),
            "sequences_per_s": float(history["sequences_per_s"]),
            "windows_per_epoch": int(history.get("n_windows", 0)),
            "networks": dg.MetadataValue.json([{k: v if isinstance(v, (str, int)) else float(v) for k, v in n.items()}
                                               for n in history["networks"]]),
            # the whole list is the MLflow run's batches.json (a full retrain's would be every batch id)
            "new_batches": len(trained.new_batches),
            "new_batches_latest": dg.MetadataValue.json(trained.new_batches[-20:]),
            "config": dg.MetadataValue.json(model_config.to_dict()),
            "training_curves": dg.MetadataValue.md(figure_to_md(curves, alt="training curves")),
        },
    )
