"""The recommenders: SASRec (``sasrec``, trained by ``training``), the baselines (EASE,
content, in ``baselines``), blending (``hybrid``), diversity re-ranking (``rerank``) and the
served hybrid with its one training entry point (``recommender``)."""

from rec_models.models.baselines import (
    DEFAULT_EASE_LAMBDAS,
    EASE,
    ContentRecommender,
    binary_matrix,
    tune_content,
    tune_ease,
)
from rec_models.models.hybrid import (
    HybridScorer,
    blend,
    standardize_scores,
    tune_hybrid,
)
from rec_models.models.losses import LOSSES, sampled_softmax_loss
from rec_models.models.recommender import (
    HybridRecommender,
    RecommenderConfig,
    share_content_scores,
    train_recommender,
    user_sample,
)
from rec_models.models.rerank import MMRReranker
from rec_models.models.sasrec import (
    DEFAULT_ALPHAS,
    DEFAULT_EVENT_TYPE,
    RATING_FEATURE_OFFSET,
    SASRecBackbone,
    SASRecConfig,
    event_features,
    left_pad,
    load_backbone,
    save_backbone,
)
from rec_models.models.training import (
    recommend,
    svd_item_factors,
    train_sasrec,
    training_counts,
)
from rec_models.models.windows import TrainingWindows, build_training_windows

__all__ = ["DEFAULT_ALPHAS", "DEFAULT_EASE_LAMBDAS", "LOSSES", "RATING_FEATURE_OFFSET", "binary_matrix",
           "build_training_windows", "TrainingWindows", "sampled_softmax_loss", "DEFAULT_EVENT_TYPE", "EASE", "ContentRecommender", "HybridRecommender", "HybridScorer", "MMRReranker",
           "RecommenderConfig", "SASRecBackbone", "SASRecConfig", "blend", "event_features", "left_pad",
           "load_backbone", "recommend", "save_backbone", "standardize_scores", "svd_item_factors", "train_recommender",
           "share_content_scores", "train_sasrec", "training_counts", "tune_content", "tune_ease", "tune_hybrid", "user_sample"]
