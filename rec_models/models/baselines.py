"""Non-sequential baselines with the evaluation's score-function convention: EASE (closed
form, primal or dual) and the content model (text similarity to recent items)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rec_models.data import LeaveLastOutSplit, UserSequences, unique_sorted
from rec_models.evaluation import evaluate_split

DEFAULT_EASE_LAMBDAS = (10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
DEFAULT_CONTENT_WINDOWS = (1, 3, 10, 30, 100)


def binary_matrix(histories: Sequence[np.ndarray], n_columns: int, column_of: np.ndarray) -> torch.Tensor:
    """Dense float64 [len(histories), n_columns]: 1 where the user's history holds the item.

    ``column_of[item]`` is the item's column, -1 for items without one (ignored).
    """
    matrix = torch.zeros(len(histories), n_columns, dtype=torch.float64)
    for row, history in enumerate(histories):
        columns = column_of[np.asarray(history, dtype=np.int64)]
        matrix[row, torch.from_numpy(columns[columns >= 0])] = 1.0
    return matrix


class EASE:
    """Embarrassingly Shallow Autoencoder; ``fit`` solves the closed form exactly (float64).

    Only items with training interactions get a column. ``dual`` chooses the Woodbury form
    (solve in user space); None picks it when there are fewer users than items.
    """

    def __init__(self, lam: float = 50.0, dual: bool | None = None) -> None:
        if lam <= 0:
            raise ValueError("lam must be positive")
        self.lam = lam
        self.dual = dual
        self.n_items = 0
        self._items: np.ndarray | None = None  # item index of each column
        self._column_of: np.ndarray | None = None
        self._weights: torch.Tensor | None = None  # primal: B [m, m]
        self._train: torch.Tensor | None = None  # dual: X [U, m]
        self._dual_inverse: torch.Tensor | None = None  # dual: (X X^T + lam I)^-1 [U, U]
        self._p_diagonal: torch.Tensor | None = None  # dual: diag(P) [m]

    def fit(self, seqs: UserSequences, n_items: int) -> EASE:
        all_items = np.concatenate([*seqs.items, np.zeros(0, dtype=np.int64)])
        self.n_items = n_items
        self._items = unique_sorted(all_items[all_items > 0])
        self._column_of = np.full(n_items + 1, -1, dtype=np.int64)
        self._column_of[self._items] = np.arange(len(self._items))
        x = binary_matrix(seqs.items, len(self._items), self._column_of)
        dual = self.dual if self.dual is not None else x.shape[0] < x.shape[1]
        if dual:
            gram = x @ x.T + self.lam * torch.eye(x.shape[0], dtype=torch.float64)
            inverse = torch.linalg.inv(gram)
            self._train, self._dual_inverse = x, inverse
            self._p_diagonal = (1.0 - ((inverse @ x) * x).sum(dim=0)) / self.lam
            self._weights = None
        else:
            gram = x.T @ x + self.lam * torch.eye(x.shape[1], dtype=torch.float64)
            p = torch.linalg.inv(gram)
            weights = -p / p.diagonal()[None, :]
            weights.fill_diagonal_(0.0)
            self._weights = weights
            self._train = self._dual_inverse = self._p_diagonal = None
        return self

    def weights(self) -> torch.Tensor:
        """The item-item matrix B [m, m] over the fitted columns (built on demand in dual form)."""
        self._require_fit()
        if self._weights is not None:
            return self._weights
        m = len(self._items)
        identity = torch.eye(m, dtype=torch.float64)
        p = (identity - self._train.T @ self._dual_inverse @ self._train) / self.lam
        weights = -p / self._p_diagonal[None, :]
        return weights.fill_diagonal_(0.0)

    def score(
        self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None
    ) -> torch.Tensor:
        """Scores float32 [B, n_items + 1]; items without a column (and padding) get -inf."""
        self._require_fit()
        dtype = (self._weights if self._weights is not None else self._train).dtype
        x = binary_matrix(histories, len(self._items), self._column_of).to(dtype)
        if self._weights is not None:
            column_scores = x @ self._weights
        else:
            # X_q B = X_q - (X_q P) diag(1/diag P), with X_q P from the Woodbury form. A loaded
            # model keeps X sparse (``from_state``): X's products cost its ones, not users x items.
            if self._train.layout == torch.sparse_csr:
                user_side = (self._train @ x.T).T  # x X^T
                back = (self._train_t @ (user_side @ self._dual_inverse).T).T  # (.) X
            else:
                back = (x @ self._train.T) @ self._dual_inverse @ self._train
            xp = (x - back) / self.lam
            column_scores = x - xp / self._p_diagonal[None, :]
        scores = torch.full((len(histories), self.n_items + 1), -math.inf, dtype=torch.float32)
        scores[:, torch.from_numpy(self._items)] = column_scores.float()
        return scores

    def _require_fit(self) -> None:
        if self._items is None:
            raise RuntimeError("call fit() first")

    def grow(self, n_items: int) -> None:
        """Score a larger catalog: the new items have no column (they score -inf)."""
        self._require_fit()
        if n_items > self.n_items:
            self._column_of = np.pad(self._column_of, (0, n_items - self.n_items), constant_values=-1)
            self.n_items = n_items

    def state(self) -> dict:
        """The fitted model as float32 tensors (for ``torch.save``; ``from_state`` rebuilds it).
        The dual form keeps X as the indices of its ones, so it stays small."""
        self._require_fit()
        state = {"lam": self.lam, "n_items": self.n_items, "items": torch.from_numpy(self._items)}
        if self._weights is not None:
            state["weights"] = self._weights.float()
        else:
            ones = self._train.to_sparse_coo().coalesce().indices().T if self._train.layout == torch.sparse_csr else self._train.nonzero()
            state["train_ones"] = ones.to(torch.int32)
            state["train_shape"] = list(self._train.shape)
            state["dual_inverse"] = self._dual_inverse.float()
            state["p_diagonal"] = self._p_diagonal.float()
        return state

    @classmethod
    def from_state(cls, state: dict) -> EASE:
        """The model ``state()`` describes; it scores in float32."""
        model = cls(float(state["lam"]))
        model.n_items = int(state["n_items"])
        model._items = state["items"].numpy().astype(np.int64)
        model._column_of = np.full(model.n_items + 1, -1, dtype=np.int64)
        model._column_of[model._items] = np.arange(len(model._items))
        if "weights" in state:
            model._weights = state["weights"]
        else:
            ones = state["train_ones"].long().T
            train = torch.sparse_coo_tensor(ones, torch.ones(ones.shape[1]), size=state["train_shape"],
                                            check_invariants=True).coalesce()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                model._train, model._train_t = train.to_sparse_csr(), train.t().coalesce().to_sparse_csr()
            model._dual_inverse, model._p_diagonal = state["dual_inverse"], state["p_diagonal"]
        return model


def tune_ease(
    split: LeaveLastOutSplit,
    n_items: int,
    lambdas: Sequence[float] = DEFAULT_EASE_LAMBDAS,
) -> tuple[EASE, dict[float, float]]:
    """Fit EASE for each ``lam`` on the training histories; keep the best validation NDCG@10.

    Returns the best model and ``{lam: val_ndcg@10}``.
    """
    results: dict[float, float] = {}
    best: EASE | None = None
    for lam in lambdas:
        model = EASE(lam).fit(split.train, n_items)
        results[lam] = evaluate_split(model.score, split, n_items, stage="val")["ndcg@10"]
        if best is None or results[lam] > results[best.lam]:
            best = model
    return best, results


class ContentRecommender:
    """Scores items by text-embedding similarity to the user's recent history.

    The user profile is the mean of the embeddings of the latest ``window`` history items,
    weighted ``decay ** age`` (age 0 = newest); scores are cosine similarities. Rows of
    ``item_embeddings`` [n_items + 1, d] that are all zero (padding, no text) score 0.
    """

    def __init__(self, item_embeddings: np.ndarray | torch.Tensor, window: int = 10, decay: float = 0.9) -> None:
        if window < 1 or not 0.0 < decay <= 1.0:
            raise ValueError("window must be >= 1 and decay in (0, 1]")
        self.embeddings = F.normalize(torch.as_tensor(item_embeddings, dtype=torch.float32), dim=1)
        self.window = window
        self.decay = decay

    @property
    def n_items(self) -> int:
        return self.embeddings.shape[0] - 1

    def profiles(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-norm user profiles [B, d] (zero for an empty history)."""
        profiles = torch.zeros(len(histories), self.embeddings.shape[1])
        for row, history in enumerate(histories):
            recent = np.asarray(history, dtype=np.int64)[-self.window :]
            if len(recent) == 0:
                continue
            weights = self.decay ** torch.arange(len(recent) - 1, -1, -1, dtype=torch.float32)
            profiles[row] = weights @ self.embeddings[torch.tensor(recent)]  # a copy: histories may be read-only views
        return F.normalize(profiles, dim=1)

    def score(
        self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None
    ) -> torch.Tensor:
        """Cosine similarities [B, n_items + 1] of every item to each user's profile."""
        return self.profiles(histories) @ self.embeddings.T


def tune_content(
    split: LeaveLastOutSplit,
    item_embeddings: np.ndarray | torch.Tensor,
    windows: Sequence[int] = DEFAULT_CONTENT_WINDOWS,
    decay: float = 0.9,
) -> tuple[ContentRecommender, dict[int, float]]:
    """Pick the history window with the best validation NDCG@10; returns model and results."""
    results: dict[int, float] = {}
    best: ContentRecommender | None = None
    for window in windows:
        model = ContentRecommender(item_embeddings, window, decay)
        results[window] = evaluate_split(model.score, split, model.n_items, stage="val")["ndcg@10"]
        if best is None or results[window] > results[best.window]:
            best = model
    return best, results
