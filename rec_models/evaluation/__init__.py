"""Offline evaluation under ../shared/benchmarks/PROTOCOL.md: metrics (``metrics``), the
protocol's split and slices (``protocol``), the held-out user sample (``sampling``) and ``recsys
evaluate`` (``offline``)."""

from rec_models.evaluation.metrics import (
    EVAL_BATCH,
    PopularityRecommender,
    RankingMetrics,
    ScoreFn,
    eval_batch_size,
    evaluate_ranking,
    pad_histories,
    paired_difference,
)
from rec_models.evaluation.protocol import (
    cold_start_split,
    cold_start_users,
    evaluate_split,
    item_popularity,
    protocol_sequences,
    select_cold_items,
)
from rec_models.evaluation.sampling import stratified_order, stratified_user_sample

__all__ = ["EVAL_BATCH", "eval_batch_size", "PopularityRecommender", "RankingMetrics", "ScoreFn", "cold_start_split", "cold_start_users",
           "evaluate_ranking", "evaluate_split", "item_popularity", "pad_histories", "paired_difference",
           "protocol_sequences", "select_cold_items", "stratified_order", "stratified_user_sample"]
