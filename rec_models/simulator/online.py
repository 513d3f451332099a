"""The simulator as an online environment: its users ask a recommender for a list, look at it
with a position-biased attention, click (and sometimes buy) by their hidden, drifting tastes,
and browse organically beside it (docs/simulator.md).

Every round is one simulated day after batch 0. The same users, organic browsing and random
draws (common random numbers) are used for every recommender asked in a round, so arms are
compared on identical situations and differ only by the lists they showed.

A user does not click an item again: what they consumed before (their batch-0 history, their
organic browsing of earlier rounds and of this one, and what they clicked in lists of the same
recommender) is skipped when shown. Each recommender (``arm``) keeps its own record of clicks,
because its users clicked what it showed them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rec_models.data.schema import EVENT_TYPES
from rec_models.simulator.core import FeedbackSimulator
from rec_models.simulator.helpers import _sample_rows, _sample_within_category, _user_id
from rec_models.simulator.parameters import (
    DRIFT_DAYS,
    EVENT_MIX_DISLIKED,
    EVENT_MIX_LIKED,
    LIKING_BIAS,
    LIKING_CATEGORY_WEIGHT,
    LIKING_IN_TASTE,
    LIKING_NOISE,
    LIKING_TAG,
    P_EXPLORE,
    POPULARITY_WEIGHT,
    STYLE_WEIGHT,
    TAG_WEIGHT,
)
from rec_models.simulator.vocabulary import CATEGORIES

ATTENTION = 0.8  # the user looks at rank i with probability ATTENTION ** (i - 1)
CLICK_SHARPNESS = 4  # P(click | looked) = CLICK_SCALE * liking ** CLICK_SHARPNESS: items the user really likes
CLICK_SCALE = 0.5
PURCHASE_GIVEN_CLICK = 0.3  # times liking
ROUND_S = 86_400  # one simulated day per round
STREAM = 101  # random stream of the online environment (the batch streams are < 100)

# recommend(user_ids, recent item ids per user, k) -> (item ids per user, request id per user)
Recommend = Callable[[list[str], list[list[str]], int], tuple[list[list[str]], list[str | None]]]


@dataclass(frozen=True)
class OnlineConfig:
    users_per_round: int = 200
    browse_events: int = 3  # organic events per active user and round (sent as recent items)
    k: int = 10
    drift: float = 1.0  # multiplies the simulator's drift rate (1 / DRIFT_DAYS per day)
    seed: int = 0


class OnlineEnvironment:
    def __init__(self, simulator: FeedbackSimulator, config: OnlineConfig | None = None):
        self.sim = simulator
        self.config = config or OnlineConfig()
        self.items = simulator._items_through(0)  # the catalog of batch 0 (no new items online)
        n_users = simulator.config.n_users
        self.users = simulator._users_by_index(np.arange(n_users))
        self.user_ids = np.array([_user_id(i) for i in self.users.index], dtype=object)
        self.start = simulator._window(0)[1]  # the end of batch 0
        overlap = self.users.tags @ self.items.tags.T
        self.shared = np.minimum(overlap, 3)
        self.preference = (TAG_WEIGHT * overlap + STYLE_WEIGHT * (self.users.style @ self.items.style.T)
                           + POPULARITY_WEIGHT * self.items.log_popularity)
        self.index = {item: i for i, item in enumerate(self.items.ids)}
        self.consumed: dict[str, set[str]] = {  # shared: batch-0 history, then every round's browsing
            str(u): set(g) for u, g in simulator.events(0).groupby("user_id")["item_id"]}
        self.clicked: dict[str, dict[str, set[str]]] = {}  # per arm: what its users clicked

    def time_of(self, round_: int) -> int:
        return int(self.start + round_ * ROUND_S)

    def taste(self, users: np.ndarray, at: int) -> np.ndarray:
        """Category mixtures at time ``at``, drifting ``config.drift`` times the usual rate."""
        days = (at - self.users.join_time[users]) / 86_400
        d = np.clip(self.config.drift * days / DRIFT_DAYS, 0.0, 1.0)[:, None]
        return (1 - d) * self.users.early_taste[users] + d * self.users.late_taste[users]

    def liking(self, users: np.ndarray, items: np.ndarray, at: int, noise: np.ndarray) -> np.ndarray:
        """P(the user likes the item) now, for aligned arrays of users and items."""
        taste = self.taste(users, at)[np.arange(len(users)), self.items.category[items]]
        logit = (LIKING_BIAS + LIKING_IN_TASTE * (taste > 0) + LIKING_CATEGORY_WEIGHT * taste
                 + LIKING_TAG * self.shared[users, items] + LIKING_NOISE * noise)
        return 1 / (1 + np.exp(-logit))

    def round(self, round_: int) -> Round:
        """Who is active in round ``round_`` and what they browse organically (the same for
        every recommender asked)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, STREAM, round_])
        at = self.time_of(round_)
        users = np.sort(rng.choice(len(self.user_ids), size=min(cfg.users_per_round, len(self.user_ids)),
                                   replace=False))
        user_of = np.repeat(np.arange(len(users)), cfg.browse_events)
        taste = self.taste(users, at)
        mixture = (1 - P_EXPLORE) * taste + P_EXPLORE / len(CATEGORIES)
        category = _sample_rows(mixture[user_of], rng.random(len(user_of)))
        item = _sample_within_category(self.preference[users], self.items.category, len(CATEGORIES), user_of,
                                       category, rng.random(len(user_of)))
        liking = self.liking(users[user_of], item, at, rng.normal(size=len(user_of)))
        kind = _sample_rows(liking[:, None] * EVENT_MIX_LIKED + (1 - liking[:, None]) * EVENT_MIX_DISLIKED,
                            rng.random(len(user_of)))
        stamps = at + np.sort(rng.integers(0, ROUND_S // 2, len(user_of)))
        organic = pd.DataFrame({"user_id": self.user_ids[users[user_of]], "item_id": self.items.ids[item],
                                "event_type": np.array(EVENT_TYPES, dtype=object)[kind],
                                "value": np.where(np.array(EVENT_TYPES)[kind] == "rating",
                                                  np.clip(np.round(2 * (1 + 4 * liking)) / 2, 0.5, 5.0), np.nan),
                                "timestamp": stamps})
        for user, items in organic.groupby("user_id")["item_id"]:  # what they browse is consumed (idempotent)
            self.consumed.setdefault(str(user), set()).update(items)
        return Round(round_, at, users, organic, rng.random((len(users), cfg.k)), rng.random((len(users), cfg.k)),
                     rng.normal(size=(len(users), cfg.k)))

    def react(self, state: Round, lists: list[list[str]], request_ids: list[str | None], arm: str) -> pd.DataFrame:
        """Clicks and purchases of the round's users on the lists ``arm`` showed them (one list
        per active user, in ``state.users`` order); unknown and already consumed items are
        ignored."""
        rows = []
        clicked = self.clicked.setdefault(arm, {})
        for n, (user, served, request_id) in enumerate(zip(state.users, lists, request_ids)):
            uid = self.user_ids[user]
            before = (self.consumed.get(uid, set()), clicked.setdefault(uid, set()))
            for rank, item_id in enumerate(served[: self.config.k]):
                item = self.index.get(item_id)
                if item is None or any(item_id in s for s in before):
                    continue
                liking = self.liking(np.array([user]), np.array([item]), state.at, state.noise[n, rank: rank + 1])[0]
                looked = state.attention[n, rank] < ATTENTION ** rank
                if not (looked and state.click[n, rank] < CLICK_SCALE * liking ** CLICK_SHARPNESS):
                    continue
                at = int(state.at + ROUND_S // 2 + 60 * n + rank)
                rows.append({"user_id": uid, "item_id": item_id, "event_type": "click", "timestamp": at,
                             "request_id": request_id})
                clicked[uid].add(item_id)
                if state.click[n, rank] < PURCHASE_GIVEN_CLICK * CLICK_SCALE * liking ** (CLICK_SHARPNESS + 1):
                    rows.append({"user_id": uid, "item_id": item_id, "event_type": "purchase", "timestamp": at + 30,
                                 "request_id": request_id})
        return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp", "request_id"])

    def play(self, state: Round, recommend: Recommend, arm: str) -> tuple[pd.DataFrame, np.ndarray]:
        """Ask ``recommend`` (the recommender ``arm``) for every active user, with their organic
        items of the round as recent items, and return (their reactions, whether each user
        clicked anything)."""
        uids = list(self.user_ids[state.users])
        recent = state.organic.groupby("user_id", sort=False)["item_id"].agg(list).reindex(uids)
        lists, request_ids = recommend(uids, [r if isinstance(r, list) else [] for r in recent], self.config.k)
        reactions = self.react(state, lists, request_ids, arm)
        clicked = np.isin(uids, reactions.loc[reactions["event_type"] == "click", "user_id"].unique())
        return reactions, clicked


@dataclass
class Round:
    number: int
    at: int  # epoch seconds of the round's start
    users: np.ndarray  # active users (simulator indices)
    organic: pd.DataFrame  # their organic browsing (events)
    attention: np.ndarray  # (users, k) uniforms: looked at rank i when below ATTENTION ** i
    click: np.ndarray  # (users, k) uniforms: clicked when below CLICK_SCALE * liking ** CLICK_SHARPNESS
    noise: np.ndarray  # (users, k) normals: the liking noise of each shown slot
