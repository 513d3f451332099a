"""Small pieces of the simulator: ids, titles, descriptions, reviews, weighted sampling and
item neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rec_models.data.schema import (
    CATALOG_COLUMNS,
)
from rec_models.simulator.parameters import N_NEIGHBOURS, NEIGHBOUR_STYLE_WEIGHT, _Items
from rec_models.simulator.vocabulary import (
    CATEGORIES,
    DESCRIPTION_CLOSERS,
    DESCRIPTION_OPENERS,
    NEGATIVE_REVIEWS,
    POSITIVE_REVIEWS,
    Category,
)


def _check_batch(batch: int) -> None:
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")


def _item_id(index: int) -> str:
    return f"i{index:05d}"


def _user_id(index: int) -> str:
    return f"u{index:05d}"


def _empty_catalog() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="string") for c in CATALOG_COLUMNS})
    frame["tags"] = frame["tags"].astype(object)
    return frame


def _pick(options: tuple[str, ...], u: float) -> str:
    """The option a uniform number in [0, 1) points at."""
    return options[int(u * len(options))]


def _title(cat: Category, u: np.ndarray) -> str:
    noun = int(u[2] * len(cat.nouns))
    extra = int(u[4] * len(cat.extras))
    title = _pick(cat.title_patterns, u[0]).format(
        adj=_pick(cat.adjectives, u[1]),
        noun=cat.nouns[noun],
        noun2=cat.nouns[(noun + 1 + int(u[3] * (len(cat.nouns) - 1))) % len(cat.nouns)],
        extra=cat.extras[extra],
        extra2=cat.extras[(extra + 1 + int(u[3] * (len(cat.extras) - 1))) % len(cat.extras)],
    )
    return title[0].upper() + title[1:]  # "the Vikings and ..." starts a title


def _description(cat: Category, themes: list[str], u: np.ndarray) -> str:
    mood = _pick(cat.moods, u[6])
    article = "An" if mood[0] in "aeiou" else "A"
    words = {"A_mood": f"{article} {mood}", "mood": mood, "kind": cat.kind, "audience": cat.audience,
             "t1": themes[0], "t2": themes[1], "t3": themes[2]}
    sentence = _pick(DESCRIPTION_OPENERS, u[7]).format(**words)
    if u[12] < 0.6:  # a second sentence for ~60% of items
        sentence += " " + _pick(DESCRIPTION_CLOSERS, u[13]).format(**words)
    return sentence


def _review(items: _Items, item: int, liking: float, u: float) -> str:
    templates = POSITIVE_REVIEWS if liking >= 0.5 else NEGATIVE_REVIEWS
    kind = CATEGORIES[items.category[item]].kind
    return _pick(templates, u).format(kind=kind, theme=items.lead_theme[item])


def _sample_rows(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One column index per row, drawn proportionally to that row's non-negative weights."""
    cumulative = np.cumsum(weights, axis=1)
    hits = (uniforms * cumulative[:, -1])[:, None] >= cumulative
    return np.minimum(hits.sum(axis=1), weights.shape[1] - 1)


def _segment_cumsum(values: np.ndarray, starts: np.ndarray, segment_of: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each segment (segments contiguous, starting at ``starts``)."""
    total = np.cumsum(values)
    return total - (total[starts] - values[starts])[segment_of]


def _sample_within_category(log_weight: np.ndarray, item_category: np.ndarray, n_categories: int,
                            rows: np.ndarray, categories: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """For each query ``(rows[q], categories[q])`` draw an item of that category with
    probability proportional to ``exp(log_weight[row, item])``.

    All queries are answered by one binary search: the columns are grouped by category, each
    (row, category) segment's cumulative distribution is normalised to (0, 1] and shifted by
    ``row * n_categories + category``, which makes the whole flattened matrix sorted.
    Every category must have at least one item."""
    n_rows, n_cols = log_weight.shape
    order = np.argsort(item_category, kind="stable")
    sorted_category = item_category[order]
    counts = np.bincount(item_category, minlength=n_categories)
    ends = np.cumsum(counts)
    starts = ends - counts

    cdf = log_weight[:, order]
    cdf -= cdf.max(axis=1, keepdims=True)
    np.exp(cdf, out=cdf)
    np.cumsum(cdf, axis=1, out=cdf)
    before = np.where(starts > 0, cdf[:, np.maximum(starts - 1, 0)], 0.0)
    total = cdf[:, ends - 1] - before
    cdf -= before[:, sorted_category]
    cdf /= total[:, sorted_category]
    cdf[:, ends - 1] = 1.0
    cdf += (np.arange(n_rows) * n_categories)[:, None]
    cdf += sorted_category
    hits = np.searchsorted(cdf.ravel(), rows * n_categories + categories + uniforms, side="right")
    return order[hits % n_cols]


def _neighbours(items: _Items) -> np.ndarray:
    """(n_items, N_NEIGHBOURS) indices of each item's most similar items in its category:
    tag cosine plus ``NEIGHBOUR_STYLE_WEIGHT`` times style cosine. Categories with fewer
    items repeat neighbours; an item alone in its category is its own neighbour."""
    result = np.zeros((len(items.ids), N_NEIGHBOURS), dtype=np.int64)
    unit_tags = items.tags / np.linalg.norm(items.tags, axis=1, keepdims=True)
    for c in range(len(CATEGORIES)):
        members = np.flatnonzero(items.category == c)
        similarity = unit_tags[members] @ unit_tags[members].T
        similarity += NEIGHBOUR_STYLE_WEIGHT * (items.style[members] @ items.style[members].T)
        if len(members) > 1:
            np.fill_diagonal(similarity, -np.inf)
        k = min(N_NEIGHBOURS, max(len(members) - 1, 1))
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        result[members] = members[nearest[:, np.arange(N_NEIGHBOURS) % k]]
    return result


def _follow_neighbours(item: np.ndarray, follows: np.ndarray, position: np.ndarray, user_of: np.ndarray,
                       preference: np.ndarray, neighbours: np.ndarray, rng: np.random.Generator) -> None:
    """Replace ``item[e]`` for every following event by the neighbour of ``item[e - 1]`` the
    user prefers most (preference plus Gumbel noise, i.e. a softmax draw). Done position by
    position so chains of follows see their already updated predecessor."""
    followers = np.flatnonzero(follows)
    followers = followers[np.argsort(position[followers], kind="stable")]
    noise = rng.gumbel(size=(len(followers), neighbours.shape[1]))
    boundaries = np.flatnonzero(np.diff(position[followers])) + 1
    for chunk in np.split(np.arange(len(followers)), boundaries):
        events = followers[chunk]
        candidates = neighbours[item[events - 1]]
        scores = preference[user_of[events][:, None], candidates] + noise[chunk]
        item[events] = candidates[np.arange(len(events)), scores.argmax(axis=1)]
