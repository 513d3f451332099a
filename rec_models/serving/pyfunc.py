"""The MLflow pyfunc around ``Recommender``: client mistakes become HTTP 400, anything else a
plain HTTP 500 without a stack trace."""

from __future__ import annotations

import logging

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from rec_models.allocator import keep_freed_memory
from rec_models.serving.recommender import Recommender, serving_pseudonym_key
from rec_models.serving.requests import DEFAULT_K, InvalidRequest

logger = logging.getLogger(__name__)


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: rows of (user_id, recent_item_ids?, k?, exclude?) → ranked
    (item_id, score, title, explanation, warnings)."""

    def load_context(self, context) -> None:
        keep_freed_memory()  # a served model scores [batch, n_items] tensors: see rec_models.allocator
        self.recommender = Recommender(context.artifacts["bundle"], serving_pseudonym_key())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return self.recommender.recommend(model_input)
        except InvalidRequest as error:  # the client's mistake: HTTP 400 with the message
            raise MlflowException(f"invalid request: {error}", error_code=INVALID_PARAMETER_VALUE) from None
        except Exception:
            # The scoring server would answer any other exception with a stack trace; log it
            # here and answer a plain HTTP 500 instead.
            logger.exception("recommendation failed")
            raise MlflowException("internal error while recommending (see the server log)",
                                  error_code=INTERNAL_ERROR) from None


def example_request(user_ids: list[str], recent: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": user_ids,
        "recent_item_ids": [recent] * len(user_ids),
        "k": [DEFAULT_K] * len(user_ids),
        "exclude": [recent[:1]] * len(user_ids),
        "diversity": [0.0] * len(user_ids),
        "context_text": [""] * len(user_ids),
    })
