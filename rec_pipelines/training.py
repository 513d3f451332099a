"""Training and held-out evaluation as the pipeline runs them (the assets in
``defs/training`` and ``defs/registry`` are thin calls into this): training data under the
protocol, full or micro-batch training of the candidate with its MLflow run and served
bundle, and the metrics of a model on the held-out users."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch

import mlflow
from rec_models.data import (
    ItemVocab,
    LeaveLastOutSplit,
    UserSequences,
    unique_sorted,
)
from rec_models.evaluation import (
    PopularityRecommender,
    RankingMetrics,
    eval_batch_size,
    evaluate_ranking,
    paired_difference,
    stratified_order,
)
from rec_models.files import as_location, write_json_atomic
from rec_models.models import (
    HybridRecommender,
    RecommenderConfig,
    share_content_scores,
    train_recommender,
    user_sample,
)
from rec_models.serving import example_request, write_bundle
from rec_pipelines.item_embeddings import ItemEmbeddings
from rec_pipelines.lake import LastCopy, StaleLakeTable
from rec_pipelines.plots import new_figure
from rec_pipelines.registry import (
    BATCHES_ARTIFACT,
    CHAMPION,
    MIN_COLD_USERS,
    NDCG_TOLERANCE,
    MlflowEpochMetrics,
    ModelRegistry,
    metric_key,
)
from rec_pipelines.user_table import UserTable, training_data_from

MODES = ("auto", "full", "incremental")
FINETUNE_SETTINGS = ("finetune_max_epochs", "finetune_patience", "finetune_lr", "finetune_val_users", "max_time_s", "diversity",
                     "accelerator", "devices", "strategy", "num_nodes")
"""What a micro-batch run takes from its own config (its budget and the hardware it runs on);
every other setting is the champion's."""
DEFAULT_EVAL_USERS = 5_000
"""Held-out users the gate scores when there are more (a stratified sample, so evaluation cost
stops growing with the user count). The paired SE of the per-user NDCG@10 difference is s/sqrt(n).
Measured s: 0.0054 * sqrt(610) = 0.133 on ml-latest-small (NDCG 0.06, s/NDCG 2.2) and
0.0014 * sqrt(1989) = 0.062 on the simulator (NDCG ~0.1, s/NDCG 0.6). SE < 15 % of the NDCG
needs n > (2.2 / 0.15)^2 = 220 users; 5,000 gives SE = 0.133 / 70.7 = 0.0019 (3 % of 0.06, under
the gate's 0.002 tolerance) and keeps SE < 15 % for s/NDCG up to 0.15 * sqrt(5000) = 10.6."""
DEFAULT_TARGET_SE_RELATIVE = 0.05
"""The gate stops scoring its sample once the paired SE is at most this share of the champion's
NDCG@10: a third of the issue's 15 %, so the largest shortfall noise may excuse (10 %) shows at
two standard errors. At 10M events (100k items) fine-tunes against their champion reached it
after 1,000 users (4.8 %) and would have after 3,000 (3.7 % at 5,000)."""
DEFAULT_STEP_USERS = 500
"""Users the gate scores between two looks at the standard error (at 10M events, 100k items,
~2.5 s for candidate and champion)."""
CLEAR_SE_RELATIVE = 0.15
"""The gate also stops once its decision is clear (``evaluate_in_steps``' ``clear_tolerance``),
but never with a paired SE above this share of the champion's NDCG@10 (the issue's floor)."""
CLEAR_ALPHA = 0.05
"""Chance that a clear stop is wrong, over all looks together (Bonferroni: each look tests at
``CLEAR_ALPHA / looks``)."""
MIN_DISCORDANT_USERS = 5
"""Neither stop comes before this many scored users' NDCG@10 differ between the two models. At
a low NDCG (10M events: ~0.006) 500 users hold only one or two such users, and an SE from them
is no estimate: in ``benchmarks/gate_stopping.py`` (the gate at NDCG ~0.006) stopping without
this promoted a candidate with a third of the champion's NDCG 2.8 % of the time and one with
half of it 14 % (scoring every sampled user: 0.1 % and 8.6 %; with it: 0.1 % and 8.9 %), while
an equally good fine-tune is still judged on 2,650 users on average instead of 5,000."""


@dataclass
class TrainingData:
    """Everything training and evaluation share, in vocab indices."""

    vocab: ItemVocab
    sequences: UserSequences  # every user's full history (serving uses it)
    split: LeaveLastOutSplit  # protocol split of users with >= 5 interactions
    user_batches: dict[str, list[str]]  # batch ids each user has events in
    batches: list[str]  # every batch id present, in ingestion order
    validated_at: dict[str, float] = dataclasses.field(default_factory=dict)  # when each batch was last validated


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


def assemble_training_data(table: UserTable, item_catalog: pd.DataFrame, vocab_path: Path,
                           excluded_users: set[str]) -> tuple[TrainingData, dict]:
    """Sequences and split under the evaluation protocol (every rating row kept, its value as
    a feature; stable time order) of a per-user table (``user_table.update_user_table``),
    without ``excluded_users`` (bot-like). The item vocabulary is append-only and kept at
    ``vocab_path`` (catalog items join it first, then items seen only in feedback), so any
    earlier model's tables are a prefix of today's and can grow. Returns the data and its statistics."""
    vocab = _read_vocab(vocab_path)
    added = vocab.extend(item_catalog["item_id"].astype(str))
    sequences, split, user_batches, stats = training_data_from(table, vocab, excluded_users)
    write_json_atomic(vocab_path, vocab.to_dict())
    stats.update(new_items_in_vocab=added, users_in_split=len(split.train))
    return TrainingData(vocab, sequences, split, user_batches, list(table.batches), _validated_at(table)), stats


def _validated_at(table: UserTable) -> dict[str, float]:
    return dict(zip(table.covered, table.covered_at)) if table.covered_at else {}


def _read_vocab(path) -> ItemVocab:
    return ItemVocab.from_dict(json.loads(path.read_text())) if path.exists() else ItemVocab()


class StaleTrainingData(StaleLakeTable):
    """The per-user table changed since ``training_data`` handed it over."""


@dataclass(frozen=True)
class TrainingDataRef:
    """What ``training_data`` hands to the steps after it: where its data lives in the lake
    (the per-user table's version it read, the vocabulary, the users left out), not a copy of
    the history. ``load()`` gives the ``TrainingData``: the object ``training_data`` built when
    the step runs in the same process (the in-process executor: nothing read twice), else
    rebuilt from the table, refusing a table stored again since (``StaleTrainingData``)."""

    table_path: str
    table_version: str | None
    vocab_path: str
    excluded_users: tuple[str, ...]
    batches: tuple[str, ...]

    def load(self) -> TrainingData:
        if (kept := LOADED_DATA.get(self)) is not None:
            return kept
        table = UserTable.load(as_location(self.table_path))
        if table is None or table.version != self.table_version or tuple(table.batches) != self.batches:
            raise StaleTrainingData(
                f"the per-user table {self.table_path} was stored again after training_data handed it over "
                f"(version {self.table_version}, now {None if table is None else table.version}): "
                "materialise training_data again")
        vocab = _read_vocab(as_location(self.vocab_path))
        sequences, split, user_batches, _ = training_data_from(table, vocab, set(self.excluded_users))
        data = TrainingData(vocab, sequences, split, user_batches, list(table.batches), _validated_at(table))
        LOADED_DATA.keep(self, data)
        return data


LOADED_DATA = LastCopy()
"""The last ``TrainingData`` this process built or loaded, with its ref."""


def text_matrix(vocab: ItemVocab, embeddings: ItemEmbeddings) -> torch.Tensor:
    """[n_items + 1, dim] text vectors in vocab order; row 0 (padding) and items without
    catalog text are zeros."""
    vectors = embeddings.vectors if len(embeddings) else np.zeros((0, 1), np.float32)
    matrix = np.zeros((len(vocab) + 1, vectors.shape[1]), dtype=np.float32)
    rows = vocab.index(pd.Series(embeddings.item_ids).astype(str), unknown=0)
    known = rows > 0
    if known.all():  # the usual case: no masked copy of the vectors (100k items: 0.57 -> 0.03 s)
        matrix[rows] = vectors
    else:
        matrix[rows[known]] = vectors[known]
    return torch.from_numpy(matrix)


def training_record(data: TrainingData, new_batches: list[str]) -> dict:
    """What a model trained on ``data`` records of it (its run's batches.json): the batches in
    ingestion order, those new to it, and when each was last validated."""
    return {"batches": list(data.batches), "new_batches": list(new_batches),
            "validated_at": {b: data.validated_at.get(b) for b in data.batches}}


def unseen_batches(data: TrainingData, record: dict) -> list[str]:
    """The batches of ``data`` that a model whose training ``record`` (its run's batches.json)
    is given has not seen: not among its batches, or validated again since it trained (a record
    with ``validated_at`` says when each was; without it, a batch it names counts as seen)."""
    seen, seen_at = set(record["batches"]), record.get("validated_at") or {}
    return [b for b in data.batches
            if b not in seen or (seen_at.get(b) is not None and seen_at[b] != data.validated_at.get(b))]


def microbatch_users(data: TrainingData, new_batches: set[str], replay: int, seed: int) -> np.ndarray:
    """Positions (in the split) of users with feedback in ``new_batches`` (what the champion has
    not seen), plus a random replay sample of the others so the model does not forget them."""
    fresh = np.array([i for i, uid in enumerate(data.split.train.user_ids)
                      if any(b in new_batches for b in data.user_batches.get(uid, []))], dtype=np.int64)
    others = np.setdiff1d(np.arange(len(data.split.train)), fresh)
    rng = np.random.default_rng(seed)
    sample = rng.choice(others, size=min(replay, len(others)), replace=False) if len(others) else others
    return np.sort(np.concatenate([fresh, sample]))


@dataclass
class TrainingRequest:
    """What one run of ``candidate_model`` asks for."""

    mode: str  # one of MODES
    config: RecommenderConfig
    replay_users: int
    run_name: str
    run_tags: dict[str, str]
    bundle_text_encoder_dir: str | None = None  # ship this encoder in the model (requests may send context_text)


def train_candidate(request: TrainingRequest, data: TrainingData, text: torch.Tensor, titles: pd.Series,
                    user_contexts: pd.DataFrame, registry: ModelRegistry, models_dir: Path,
                    pseudonym_key_id: str | None, log: logging.Logger) -> tuple[TrainedModel, HybridRecommender, object]:
    """Train a full model, or fine-tune the champion on users with new feedback plus a replay
    sample (``auto``: whichever applies); log the run, its config, curves and the served
    pyfunc (bundle under ``models_dir``) to MLflow. Returns the trained-model record, the
    model and the training-curves figure."""
    if request.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {request.mode!r}")
    champion = registry.version_by_alias(CHAMPION)
    mode = request.mode if request.mode != "auto" else ("incremental" if champion is not None else "full")
    config, init, users_subset, new_batches = request.config, None, None, list(data.batches)
    if mode == "incremental" and champion is None:
        log.warning("no champion to fine-tune from: running a full retrain instead")
        mode = "full"
    if mode == "incremental":
        try:
            init = registry.load_recommender(CHAMPION)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            log.warning(f"champion v{champion.version} cannot be fine-tuned ({error}): full retrain instead")
            mode = "full"
    if mode == "incremental":
        new_batches = unseen_batches(data, registry.training_record(champion))
        init.grow(text)
        config = dataclasses.replace(init.config, **{name: getattr(config, name) for name in FINETUNE_SETTINGS})
        users_subset = microbatch_users(data, set(new_batches), request.replay_users, config.seed)
        log.info(f"micro-batch: fine-tuning champion v{champion.version} on {len(users_subset)} users")

    parent = champion.version if champion else None
    with registry.start_run(run_name=f"{mode}-{request.run_name}",
                            tags={**request.run_tags, "mode": mode, "parent_version": parent or ""}) as run:
        mlflow.log_params({**config.to_dict(), "mode": mode, "users": len(data.split.train),
                           "train_users": len(users_subset) if users_subset is not None else len(data.split.train),
                           "new_batches": len(new_batches)})
        mlflow.log_dict(config.to_dict(), "recommender_config.json")
        model, history = train_recommender(data.split, text, config, init=init, users_subset=users_subset,
                                           callbacks=[MlflowEpochMetrics()])
        mlflow.log_metrics({"train_s": history["train_s"], "sequences_per_s": history["sequences_per_s"],
                            "alpha": model.alpha, "ease_weight": model.ease_weight,
                            "hit_time_limit": float(history["stopped_by"] == "max_time")})
        mlflow.set_tag("stopped_by", history["stopped_by"])
        if history["stopped_by"] == "max_time":
            log.warning(f"training hit the {config.max_time_s}s safety limit: accuracy depends on machine speed")
        curves = training_curves_figure(history, mode)
        mlflow.log_figure(curves, "plots/training_curves.png")
        mlflow.log_dict(training_record(data, new_batches), BATCHES_ARTIFACT)

        bundle_dir = models_dir / run.info.run_id / "bundle"
        histories = dict(zip(data.sequences.user_ids, zip(data.sequences.items, data.sequences.event_types)))
        known = set(data.sequences.user_ids)  # (a set lookup per user: 6x faster than Series.isin at 250k)
        contexts = user_contexts.loc[np.fromiter((user not in known for user in user_contexts["user_id"].astype(str)),
                                                 dtype=bool, count=len(user_contexts))]
        write_bundle(bundle_dir, model, data.vocab, titles, histories, pseudonym_key_id=pseudonym_key_id,
                     user_contexts=contexts, text_encoder_dir=request.bundle_text_encoder_dir)
        info = registry.log_recommender(bundle_dir, example_request(data.sequences.user_ids[:2], data.vocab.ids[:2]))
    log.info(f"trained {mode} model in {history['train_s']:.1f}s (stopped by {history['stopped_by']}); "
             f"MLflow run {run.info.run_id}")
    trained = TrainedModel(run.info.run_id, info.model_uri, str(bundle_dir), mode, parent, data.batches,
                           new_batches, history)
    return trained, model, curves


def training_curves_figure(history: dict, mode: str):
    """Validation NDCG@10 and training loss per epoch (the warm start as a dashed line)."""
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


def evaluate_model(model: HybridRecommender, histories: UserSequences, targets: np.ndarray, cold: np.ndarray) -> dict:
    """Protocol metrics of what serving answers by default (``model.ranker()``) on the given users,
    plus NDCG@10 on the cold-start users (``cold`` marks users whose test item never occurs in
    training, e.g. items that arrived with new batches), and each user's NDCG@10
    (``per_user_ndcg@10``) for the paired comparison."""
    return evaluate_in_steps({"model": model}, histories, targets, cold, max(len(targets), 1), 0.0)[0]["model"]


def evaluate_in_steps(models: dict[str, HybridRecommender], histories: UserSequences, targets: np.ndarray,
                      cold: np.ndarray, step_users: int, target_se_relative: float,
                      min_cold_users: int = 0, clear_tolerance: float | None = None) -> tuple[dict[str, dict], str]:
    """``evaluate_model`` of each model on the same users, scored ``step_users`` at a time in the
    given order until, once at least ``min_cold_users`` cold users (or all of them) are scored
    and at least ``MIN_DISCORDANT_USERS`` users' NDCG@10 differ between the two (``early_stop``),

    * ``"se_target"``: the paired standard error of NDCG@10 between the first two models is at
      most ``target_se_relative`` of the second's NDCG@10, or
    * ``"clear"`` (with a ``clear_tolerance``): the first is within ``clear_tolerance`` of the
      second beyond doubt, ``diff - z * se >= -clear_tolerance`` with ``z`` at
      ``CLEAR_ALPHA`` Bonferroni-corrected over the looks the sample allows, and the SE is at
      most ``CLEAR_SE_RELATIVE`` of the second's NDCG@10. The gate (``decide_promotion``)
      promotes such a candidate on the NDCG rule whatever more users would add;

    or every user is scored (``"all"``: always with one model, or a target of 0). Every model
    scores each user batch in turn, so models with the same content model compute its scores once
    (``share_content_scores``: on the 10M home, 100k items, 2,000 users 13.0 -> 10.9 s). Returns each
    model's results (``n_users``: how many were scored) and why scoring stopped."""
    if step_users < 1:
        raise ValueError(f"step_users must be at least 1, got {step_users}")
    metrics = {name: RankingMetrics(model.n_items, 10, keep_per_user=True) for name, model in models.items()}
    looks = max(1, math.ceil(len(targets) / step_users) - 1)  # the last step scores everyone: no test there
    scored, stopped_by = 0, "all"
    batch = min(eval_batch_size(model.n_items) for model in models.values())
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(model.item_tables_frozen())
        hybrids = [model for model in models.values() if isinstance(model, HybridRecommender)]
        stack.enter_context(share_content_scores(hybrids))  # each batch is scored by every model in turn
        while scored < len(targets):
            end = min(len(targets), scored + step_users)
            for start in range(scored, end, batch):
                users = histories.subset(np.arange(start, min(end, start + batch)))
                for name, model in models.items():
                    evaluate_ranking(model.ranker(), users.items, targets[start : start + len(users)], model.n_items,
                                     event_types=users.event_types, metrics=metrics[name])
            scored = end
            if (scored < len(targets) and len(models) > 1 and target_se_relative > 0
                    and cold[:scored].sum() >= min(min_cold_users, cold.sum())):
                first, second = (metrics[name].per_user_ndcg() for name in list(models)[:2])
                why = early_stop(first, second, looks, target_se_relative, clear_tolerance)
                if why is not None:
                    stopped_by = why
                    break
    positions = np.flatnonzero(cold[:scored])
    results = {}
    for name, metric in metrics.items():
        results[name] = {**metric.compute(), "per_user_ndcg@10": metric.per_user_ndcg(), "cold_users": len(positions)}
        results[name]["cold_ndcg@10"] = (float(results[name]["per_user_ndcg@10"][positions].mean()) if len(positions)
                                         else float("nan"))
    return results, stopped_by


def early_stop(first: np.ndarray, second: np.ndarray, looks: int, target_se_relative: float,
               clear_tolerance: float | None) -> str | None:
    """Why the gate may stop scoring after the users whose NDCG@10 under two models ``first``
    (the candidate) and ``second`` (the champion) hold, or None (``evaluate_in_steps``):
    ``"se_target"`` or ``"clear"``. Never before ``MIN_DISCORDANT_USERS`` of them differ, nor on
    a champion without hits. ``looks``: how many times the sample allows asking (Bonferroni)."""
    base = second.mean()
    if base <= 0 or np.count_nonzero(first != second) < MIN_DISCORDANT_USERS:
        return None
    paired = paired_difference(first, second)
    if paired["se"] <= target_se_relative * base:
        return "se_target"
    z = NormalDist().inv_cdf(1.0 - CLEAR_ALPHA / max(looks, 1))
    if (clear_tolerance is not None and paired["se"] <= CLEAR_SE_RELATIVE * base
            and paired["diff"] - z * paired["se"] >= -clear_tolerance):
        return "clear"
    return None


def comparison_figure(results: dict):
    """Grouped bars: each model's held-out metrics side by side."""
    metrics = ["hr@10", "ndcg@10", "cold_ndcg@10"]
    names = [n for n in ("candidate", "champion", "popularity") if n in results]
    figure = new_figure(6.0, 3.5)
    axis = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [float(results[name].get(m, np.nan)) for m in metrics]
        axis.bar(np.arange(len(metrics)) + i * width, np.nan_to_num(values), width, label=name)
    axis.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, metrics)
    axis.set_title("held-out metrics (same users)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def held_out_comparison(candidate: TrainedModel, data: TrainingData, text: torch.Tensor, registry: ModelRegistry,
                        eval_users: int = DEFAULT_EVAL_USERS, seed: int = 0,
                        target_se_relative: float = DEFAULT_TARGET_SE_RELATIVE,
                        step_users: int = DEFAULT_STEP_USERS,
                        min_cold_users: int = MIN_COLD_USERS,
                        clear_tolerance: float | None = NDCG_TOLERANCE) -> tuple[dict, object]:
    """Protocol metrics (full ranking, history masked, leave-last-out test target) of the
    candidate, the current champion (grown to today's catalog: new items scored from text) and
    popularity on the same users, the paired per-user NDCG difference, all logged to the
    candidate's MLflow run with a comparison plot.

    The users are all held-out users, or when there are more than ``eval_users`` a sample of
    that many stratified by activity (``rec_models.models.user_sample``, ``seed``). They are
    scored ``step_users`` at a time in an order whose every prefix is stratified too
    (``stratified_order``), and scoring stops once the paired standard error is at most
    ``target_se_relative`` of the champion's NDCG@10 (0: score them all), or once the candidate is
    within ``clear_tolerance`` (the gate's ``ndcg_tolerance``; None: never) of the champion beyond
    doubt (``evaluate_in_steps``), and at least ``min_cold_users`` cold-start users are scored (or
    all the sample has, so the gate's cold guard still applies): a clear comparison costs a
    fraction of the sample. Returns ``{"candidate", "champion", "popularity", "paired",
    "paired_se_relative", "champion_version", "cold_users", "eval_users" (scored), "eval_sample",
    "eval_population", "eval_seed", "eval_user_ids", "eval_stopped_by"}`` (champion parts when
    one exists) and the comparison figure."""
    split = data.split
    part = user_sample(split, eval_users, seed)
    order = stratified_order(np.fromiter(map(len, part.train.items), np.int64, len(part.train)), seed)
    part = part.subset(order)
    histories, targets = part.test_histories(), part.test_targets
    trained_items = unique_sorted(np.concatenate(split.train.items)) if len(split.train) else np.zeros(0, np.int64)
    cold = ~np.isin(targets, trained_items)
    bundle = Path(candidate.bundle_dir)
    # another process or pod trained it when its scratch is gone: MLflow has the model
    models = {"candidate": HybridRecommender.load(bundle) if bundle.exists()
              else registry.load_recommender(model_uri=candidate.model_uri)}
    champion_version, unloadable = registry.version_by_alias(CHAMPION), None
    if champion_version is not None:
        try:
            champion = registry.load_recommender(CHAMPION)
            champion.grow(text)
            models["champion"] = champion
        except (OSError, KeyError, ValueError, RuntimeError) as error:  # e.g. registered by an older version
            unloadable = f"champion v{champion_version.version} cannot be evaluated by this version ({error})"
    results, stopped_by = evaluate_in_steps(models, histories, targets, cold, step_users,
                                            target_se_relative if "champion" in models else 0.0, min_cold_users,
                                            clear_tolerance)
    scored = results["candidate"]["n_users"]
    histories, targets = histories.subset(np.arange(scored)), targets[:scored]
    relative_se = None
    if "champion" in results:
        results["paired"] = paired_difference(results["candidate"].pop("per_user_ndcg@10"),
                                              results["champion"].pop("per_user_ndcg@10"))
        champion_ndcg = float(results["champion"]["ndcg@10"])
        relative_se = results["paired"]["se"] / champion_ndcg if champion_ndcg > 0 else float("nan")
    results["candidate"].pop("per_user_ndcg@10", None)
    popularity = PopularityRecommender().fit(split.train, len(data.vocab))
    results["popularity"] = evaluate_ranking(popularity.score, histories.items, targets, len(data.vocab))
    sampling = {"eval_users": scored, "eval_sample": len(part.train), "eval_population": len(split.train),
                "eval_seed": int(seed)}

    client = registry.client
    for name, value in results["candidate"].items():
        client.log_metric(candidate.run_id, f"test_{metric_key(name)}", float(value))
    for name, value in sampling.items():  # metrics, not params: evaluation may be rerun with another seed
        client.log_metric(candidate.run_id, name, float(value))
    if "champion" in results:
        client.log_metric(candidate.run_id, f"champion_test_{metric_key('ndcg@10')}", float(results["champion"]["ndcg@10"]))
        client.log_metric(candidate.run_id, "paired_ndcg_diff", results["paired"]["diff"])
        client.log_metric(candidate.run_id, "paired_ndcg_diff_se", results["paired"]["se"])
        client.log_metric(candidate.run_id, "paired_ndcg_diff_se_relative", float(relative_se))
    figure = comparison_figure(results)
    client.log_figure(candidate.run_id, figure, "plots/champion_vs_challenger.png")
    return {**results, **sampling, "paired_se_relative": relative_se, "eval_user_ids": list(histories.user_ids),
            "champion_version": champion_version.version if champion_version else None,
            "cold_users": int(cold[:scored].sum()), "champion_unloadable": unloadable,
            "eval_stopped_by": stopped_by, "eval_clear_tolerance": clear_tolerance}, figure
