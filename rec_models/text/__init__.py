"""LLM-derived text embeddings for items and users: the encoder (``encoder``), the texts
(``templates``) and the incremental cache (``cache``); docs/text.md tells the design."""

from rec_models.text.cache import EmbeddingCache, as_matrix, embed_catalog, embed_texts, text_sha256, top_k_cosine
from rec_models.text.encoder import (
    DEFAULT_TEXT_MODEL_NAME,
    TextEncoder,
    cpu_supports_fast_bf16,
    default_text_model_path,
)
from rec_models.text.templates import (
    DEFAULT_ITEM_TEMPLATE,
    REVIEW_EVENT,
    REVIEW_SEPARATOR,
    USER_CONTEXT_TEMPLATE,
    TextTemplate,
    add_reviews,
    build_user_contexts,
    latest_texts,
)

__all__ = ["DEFAULT_ITEM_TEMPLATE", "DEFAULT_TEXT_MODEL_NAME", "REVIEW_EVENT", "REVIEW_SEPARATOR", "USER_CONTEXT_TEMPLATE",
           "EmbeddingCache", "TextEncoder", "TextTemplate", "add_reviews", "as_matrix", "build_user_contexts",
           "cpu_supports_fast_bf16", "default_text_model_path", "embed_catalog", "embed_texts", "latest_texts",
           "text_sha256", "top_k_cosine"]
