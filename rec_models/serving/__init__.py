"""Serving: request validation (``requests``), the bundle and the ``Recommender`` answering
from it (``recommender``), and the MLflow pyfunc (``pyfunc``; ``pyfunc_model`` is the file
MLflow's models-from-code loads). docs/serving.md has the details."""

from rec_models.serving.pyfunc import RecommenderPyfunc, example_request
from rec_models.serving.recommender import (
    ENCODER_DIR,
    Recommender,
    serving_pseudonym_key,
    write_bundle,
)
from rec_models.serving.requests import (
    DEFAULT_K,
    EXPLANATION_PREFIX,
    INPUT_COLUMNS,
    KEY_FILE_ENV,
    MAX_K,
    OUTPUT_COLUMNS,
    InvalidRequest,
    ParsedRequest,
    parse_requests,
    parse_rows,
)

__all__ = ["DEFAULT_K", "ENCODER_DIR", "EXPLANATION_PREFIX", "INPUT_COLUMNS", "KEY_FILE_ENV", "MAX_K", "OUTPUT_COLUMNS",
           "InvalidRequest", "ParsedRequest", "Recommender", "RecommenderPyfunc", "example_request", "parse_requests",
           "parse_rows", "serving_pseudonym_key", "write_bundle"]
