"""The simulator's generative story (``FeedbackSimulator``): a catalog from the vocabulary,
users with hidden, drifting tastes, sessions of events and reviews (docs/simulator.md)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from rec_models.data.schema import (
    CATALOG_COLUMNS,
    EVENT_COLUMNS,
    EVENT_DTYPES,
    EVENT_TYPES,
    RATING_RANGE,
)
from rec_models.simulator.helpers import (
    _check_batch,
    _description,
    _empty_catalog,
    _follow_neighbours,
    _item_id,
    _neighbours,
    _pick,
    _review,
    _sample_rows,
    _sample_within_category,
    _segment_cumsum,
    _title,
    _user_id,
)
from rec_models.simulator.parameters import (
    _STREAM_EVENTS,
    _STREAM_ITEMS,
    _STREAM_SHARES,
    _STREAM_USERS,
    ACTIVE_SPAN_RANGE,
    BATCH0_DAYS,
    BATCH_HOURS,
    DRIFT_CATEGORY_WEIGHT,
    DRIFT_DAYS,
    DRIFT_USER_SHARE,
    EVENT_MIX_DISLIKED,
    EVENT_MIX_LIKED,
    FAVOURITE_COUNT_PROBS,
    FAVOURITE_TAG_DRAWS,
    IN_SESSION_GAP_MEAN_S,
    IN_SESSION_GAP_MIN_S,
    LIKING_BIAS,
    LIKING_CATEGORY_WEIGHT,
    LIKING_IN_TASTE,
    LIKING_NOISE,
    LIKING_TAG,
    NEW_ITEM_BOOST,
    NEW_USER_SHARE,
    P_EXPLORE,
    P_FOLLOW_SIMILAR,
    P_NEW_SESSION,
    P_STAY_IN_CATEGORY,
    POPULARITY_WEIGHT,
    STYLE_DIM,
    STYLE_WEIGHT,
    TAG_WEIGHT,
    ZIPF_EXPONENT,
    SimulatorConfig,
    _Items,
    _rng,
    _stack,
    _take,
    _Users,
)
from rec_models.simulator.vocabulary import CATEGORIES, CATEGORY_NAMES, GLOBAL_TAGS, TAG_INDEX, TAG_VOCABULARY, Category
from rec_models.simulator.writing import _to_jsonl, _write_if_changed

# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


class FeedbackSimulator:
    """Deterministic generator of a catalog, users and their feedback, batch by batch."""

    def __init__(self, config: SimulatorConfig | None = None):
        self.config = config or SimulatorConfig()
        self._n_new_users = max(1, round(NEW_USER_SHARE * self.config.batch_users))
        self._category_shares = _rng(self.config.seed, _STREAM_SHARES, 0).dirichlet(np.full(len(CATEGORIES), 8.0))
        # Catalog batches are built in order (titles must stay distinct across batches) and cached.
        self._item_batches: list[_Items] = []
        self._catalog_frames: list[pd.DataFrame] = []
        self._titles: set[str] = set()
        self._user_groups: dict[int, _Users] = {}

    # -- public API ---------------------------------------------------------------------------

    def catalog(self) -> pd.DataFrame:
        """The initial catalog: ``n_items`` rows with the columns of ``CATALOG_COLUMNS``."""
        self._items_through(0)
        return self._catalog_frames[0].copy()

    def catalog_update(self, batch: int) -> pd.DataFrame:
        """Items that join the catalog with batch ``batch`` (none for batch 0)."""
        _check_batch(batch)
        if batch == 0:
            return _empty_catalog()
        self._items_through(batch)
        return self._catalog_frames[batch].copy()

    def events(self, batch: int) -> pd.DataFrame:
        """Batch 0: every initial user's history; batch k >= 1: one micro-batch of feedback."""
        _check_batch(batch)
        cfg = self.config
        rng = _rng(cfg.seed, _STREAM_EVENTS, batch)
        window_start, window_end = self._window(batch)
        if batch == 0:
            users = self._user_group(0)
            first_time = users.join_time
            # At least 3 events each (fewer if the mean is lower), plus a negative binomial:
            # a long tail of heavy users around the requested mean.
            shortest = min(3, cfg.events_per_user)
            extra = cfg.events_per_user - shortest
            lengths = shortest + rng.negative_binomial(2, 2 / (2 + extra), size=len(users.index))
        else:
            n_known = cfg.n_users + (batch - 1) * self._n_new_users
            n_returning = min(cfg.batch_users - self._n_new_users, n_known)
            returning = np.sort(rng.choice(n_known, size=n_returning, replace=False))
            users = _stack([self._users_by_index(returning), self._user_group(batch)])
            first_time = np.concatenate([
                window_start + rng.uniform(0, 0.5, n_returning) * (window_end - window_start),
                users.join_time[n_returning:],
            ])
            lengths = 1 + rng.poisson(cfg.batch_events_per_user - 1, size=len(users.index))
        return self._simulate(batch, users, first_time, lengths, window_end, rng)

    def user_profiles(self, batch: int = 0) -> pd.DataFrame:
        """Hidden tastes of every user that exists by ``batch``: one row per user with
        ``user_id``, ``favourite_categories`` (by weight, heaviest first), ``favourite_tags``,
        ``drift_category`` (a category the user grows into, or None) and ``joined_at``."""
        _check_batch(batch)
        users = _stack([self._user_group(g) for g in range(batch + 1)])
        rows = []
        for i in range(len(users.index)):
            early, late = users.early_taste[i], users.late_taste[i]
            favourites = [CATEGORY_NAMES[c] for c in np.argsort(-early, kind="stable") if early[c] > 0]
            drift = [CATEGORY_NAMES[c] for c in np.flatnonzero((late > 0) & (early == 0))]
            rows.append({
                "user_id": _user_id(users.index[i]),
                "favourite_categories": favourites,
                "favourite_tags": [TAG_VOCABULARY[t] for t in np.flatnonzero(users.tags[i])],
                "drift_category": drift[0] if drift else None,
                "joined_at": int(users.join_time[i]),
            })
        return pd.DataFrame(rows)

    def write_batch(self, landing_zone: Path | str, batch: int) -> list[Path]:
        """Write batch ``batch`` into the landing zone as JSON Lines and return the file paths.

        The catalog file (if the batch has catalog rows) is written before the events file, so
        a watcher never sees feedback on items it cannot know yet. Each file appears atomically
        and an identical existing file is left untouched."""
        zone = Path(landing_zone)
        catalog = self.catalog() if batch == 0 else self.catalog_update(batch)
        paths = []
        if len(catalog):
            paths.append(_write_if_changed(zone / "catalog" / f"catalog-{batch:05d}.jsonl", _to_jsonl(catalog)))
        paths.append(_write_if_changed(zone / "events" / f"events-{batch:05d}.jsonl", _to_jsonl(self.events(batch))))
        return paths

    # -- time ---------------------------------------------------------------------------------

    def _window(self, batch: int) -> tuple[int, int]:
        """[start, end) epoch seconds of a batch's events."""
        day, hour = 86_400, 3_600
        if batch == 0:
            return self.config.start_time, self.config.start_time + BATCH0_DAYS * day
        start = self.config.start_time + BATCH0_DAYS * day + (batch - 1) * BATCH_HOURS * hour
        return start, start + BATCH_HOURS * hour

    # -- catalog ------------------------------------------------------------------------------

    def _items_through(self, batch: int) -> _Items:
        """All items that exist by ``batch`` (building and caching missing batches in order)."""
        cfg = self.config
        while len(self._item_batches) <= batch:
            b = len(self._item_batches)
            count = cfg.n_items if b == 0 else cfg.batch_new_items
            first_index = 0 if b == 0 else cfg.n_items + (b - 1) * cfg.batch_new_items
            items, frame = self._make_items(b, first_index, count)
            self._item_batches.append(items)
            self._catalog_frames.append(frame)
        return _stack(self._item_batches[: batch + 1])

    def _make_items(self, batch: int, first_index: int, count: int) -> tuple[_Items, pd.DataFrame]:
        rng = _rng(self.config.seed, _STREAM_ITEMS, batch)
        n_cat = len(CATEGORIES)
        if batch == 0:  # every category gets at least one item
            rest = rng.choice(n_cat, count - n_cat, p=self._category_shares)
            category = rng.permutation(np.concatenate([np.arange(n_cat), rest]))
            log_popularity = -ZIPF_EXPONENT * np.log1p(rng.permutation(count))
        else:
            category = rng.choice(n_cat, count, p=self._category_shares)
            log_popularity = -ZIPF_EXPONENT * np.log1p(rng.integers(0, self.config.n_items, count))
        style = rng.normal(size=(count, STYLE_DIM))
        style /= np.linalg.norm(style, axis=1, keepdims=True)
        words = rng.random((count, 14))  # uniforms that pick each item's words (see _title, _description)
        theme_keys = rng.random((count, max(len(c.themes) for c in CATEGORIES)))
        tag_keys = rng.random((count, max(len(c.tags) for c in CATEGORIES)))

        rows, lead_themes = [], []
        tag_matrix = np.zeros((count, len(TAG_VOCABULARY)), dtype=np.float32)
        for i in range(count):
            cat = CATEGORIES[category[i]]
            u = words[i]
            themes = [cat.themes[t] for t in np.argsort(theme_keys[i, : len(cat.themes)])[:3]]
            tags = [cat.tags[t] for t in np.argsort(tag_keys[i, : len(cat.tags)])[: 2 + int(u[8] * 4)]]
            if u[9] < 0.12:  # a tag borrowed from another category
                other = CATEGORIES[(category[i] + 1 + int(u[10] * (n_cat - 1))) % n_cat]
                tags.append(_pick(other.tags, u[11]))
            if u[9] > 0.92:
                tags.append(_pick(GLOBAL_TAGS, u[10]))
            tags = list(dict.fromkeys(tags))
            tag_matrix[i, [TAG_INDEX[t] for t in tags]] = 1.0
            lead_themes.append(themes[0])
            rows.append({
                "item_id": _item_id(first_index + i),
                "title": self._distinct_title(cat, u),
                "description": _description(cat, themes, u),
                "category": cat.name,
                "tags": tags,
            })
        items = _Items(
            ids=np.array([r["item_id"] for r in rows], dtype=object),
            category=category,
            tags=tag_matrix,
            style=style,
            log_popularity=log_popularity,
            arrival=np.full(count, batch),
            lead_theme=np.array(lead_themes, dtype=object),
        )
        frame = pd.DataFrame(rows, columns=CATALOG_COLUMNS) if rows else _empty_catalog()
        for column in ("item_id", "title", "description", "category"):
            frame[column] = frame[column].astype("string")
        return items, frame

    def _distinct_title(self, cat: Category, u: np.ndarray) -> str:
        """A title not used before: a pattern's title, else with a subtitle, else "Vol. n"."""
        base = _title(cat, u)
        start = int(u[5] * len(cat.subtitles))
        subtitles = cat.subtitles[start:] + cat.subtitles[:start]
        candidates = itertools.chain(
            [base], (f"{base}: {s}" for s in subtitles), (f"{base}, Vol. {v}" for v in itertools.count(2))
        )
        title = next(t for t in candidates if t not in self._titles)
        self._titles.add(title)
        return title

    # -- users --------------------------------------------------------------------------------

    def _user_group(self, group: int) -> _Users:
        """Group 0: the initial users; group k >= 1: the users new in batch k."""
        if group in self._user_groups:
            return self._user_groups[group]
        cfg = self.config
        rng = _rng(cfg.seed, _STREAM_USERS, group)
        n = cfg.n_users if group == 0 else self._n_new_users
        first = 0 if group == 0 else cfg.n_users + (group - 1) * self._n_new_users
        n_cat = len(CATEGORIES)
        rows = np.arange(n)[:, None]

        # Categories in a random order per user: the first 1-3 are favourites, the next one
        # is where drifting users' tastes go.
        ranked = np.argsort(rng.random((n, n_cat)), axis=1)
        n_favourites = rng.choice([1, 2, 3], size=n, p=FAVOURITE_COUNT_PROBS)
        is_favourite = np.arange(3)[None, :] < n_favourites[:, None]
        early = np.zeros((n, n_cat))
        early[rows, ranked[:, :3]] = rng.gamma(1.5, size=(n, 3)) * is_favourite
        early /= early.sum(axis=1, keepdims=True)
        late = np.zeros((n, n_cat))
        late[rows, ranked[:, :3]] = rng.gamma(1.5, size=(n, 3)) * is_favourite
        late /= late.sum(axis=1, keepdims=True)
        drifts = rng.random(n) < DRIFT_USER_SHARE
        late *= np.where(drifts, 1 - DRIFT_CATEGORY_WEIGHT, 1.0)[:, None]
        late[np.arange(n), ranked[:, 3]] += np.where(drifts, DRIFT_CATEGORY_WEIGHT, 0.0)

        # Favourite tags: pick favourite categories by weight, then a tag from each one's pool.
        slot_weights = np.repeat(early, FAVOURITE_TAG_DRAWS, axis=0)
        slot_category = _sample_rows(slot_weights, rng.random(n * FAVOURITE_TAG_DRAWS)).reshape(n, FAVOURITE_TAG_DRAWS)
        pool_size = np.array([len(c.tags) for c in CATEGORIES])
        pools = np.array([[TAG_INDEX[c.tags[j % len(c.tags)]] for j in range(pool_size.max())] for c in CATEGORIES])
        picks = (rng.random((n, FAVOURITE_TAG_DRAWS)) * pool_size[slot_category]).astype(int)
        tags = np.zeros((n, len(TAG_VOCABULARY)), dtype=np.float32)
        tags[rows, pools[slot_category, picks]] = 1.0

        if group == 0:  # initial users join during the first 60% of batch 0
            join_time = cfg.start_time + rng.uniform(0, 0.6 * BATCH0_DAYS * 86_400, n)
        else:
            start, end = self._window(group)
            join_time = start + rng.uniform(0, 0.5, n) * (end - start)
        users = _Users(
            index=np.arange(first, first + n),
            early_taste=early,
            late_taste=late,
            tags=tags,
            style=rng.normal(size=(n, STYLE_DIM)),
            join_time=join_time,
        )
        self._user_groups[group] = users
        return users

    def _users_by_index(self, index: np.ndarray) -> _Users:
        """Profiles of the users with these global numbers (sorted ascending, any groups)."""
        cfg = self.config
        group = np.where(index < cfg.n_users, 0, 1 + (index - cfg.n_users) // self._n_new_users)
        parts = [_take(self._user_group(0), index[:0])]  # an empty start, for an empty index
        for g in np.unique(group):  # groups hold consecutive numbers, so the order is kept
            members = self._user_group(int(g))
            parts.append(_take(members, index[group == g] - members.index[0]))
        return _stack(parts)

    # -- behaviour ----------------------------------------------------------------------------

    def _simulate(self, batch: int, users: _Users, first_time: np.ndarray, lengths: np.ndarray,
                  window_end: int, rng: np.random.Generator) -> pd.DataFrame:
        """Events of ``users`` (``lengths[u]`` each, starting at ``first_time[u]``), in
        ``EVENT_COLUMNS`` and ``EVENT_DTYPES``. Events are held as flat arrays ordered by
        user then position, so event ``e - 1`` is the previous event of the same user."""
        items = self._items_through(batch)
        n_cat = len(CATEGORIES)
        n_events = int(lengths.sum())
        user_of = np.repeat(np.arange(len(lengths)), lengths)
        user_start = np.cumsum(lengths) - lengths
        position = np.arange(n_events) - user_start[user_of]

        # Sessions and timestamps. Gaps inside a session are seconds to minutes; gaps between
        # sessions are scaled so each user's history fits inside the batch's window.
        new_session = (position == 0) | (rng.random(n_events) < P_NEW_SESSION)
        session_number = _segment_cumsum(new_session.astype(np.int64), user_start, user_of) - 1
        in_gap = np.where(new_session, 0.0, IN_SESSION_GAP_MIN_S + rng.exponential(IN_SESSION_GAP_MEAN_S, n_events))
        between_gap = np.where(new_session & (position > 0), rng.exponential(1.0, n_events), 0.0)
        room = np.maximum(window_end - 1 - first_time - np.bincount(user_of, in_gap, len(lengths)), 0.0)
        room *= rng.uniform(*ACTIVE_SPAN_RANGE, len(lengths))
        between_total = np.bincount(user_of, between_gap, len(lengths))
        scale = np.divide(room, between_total, out=np.zeros_like(room), where=between_total > 0)
        offset = _segment_cumsum(in_gap + between_gap * scale[user_of], user_start, user_of)
        timestamp = np.minimum(np.floor(first_time[user_of] + offset), window_end - 1).astype(np.int64)

        # Which category each event browses: sticky within a session, otherwise drawn from the
        # user's current taste (drifting from early to late since they joined), or explored.
        drift = np.clip((timestamp - users.join_time[user_of]) / (DRIFT_DAYS * 86_400), 0.0, 1.0)[:, None]
        taste = (1 - drift) * users.early_taste[user_of] + drift * users.late_taste[user_of]
        switches = new_session | (rng.random(n_events) > P_STAY_IN_CATEGORY)
        drawn = _sample_rows((1 - P_EXPLORE) * taste + P_EXPLORE / n_cat, rng.random(n_events))
        category = drawn[np.maximum.accumulate(np.where(switches, np.arange(n_events), 0))]

        # Which item: mostly a fresh pick from the category by the user's preference; when the
        # user stays in the category, often one of the previous item's nearest neighbours.
        overlap = users.tags @ items.tags.T
        boost = np.where(items.arrival > 0, NEW_ITEM_BOOST * 0.5 ** (batch - items.arrival), 0.0)
        preference = (TAG_WEIGHT * overlap + STYLE_WEIGHT * (users.style @ items.style.T)
                      + POPULARITY_WEIGHT * items.log_popularity + boost)
        item = _sample_within_category(preference, items.category, n_cat, user_of, category, rng.random(n_events))
        follows = ~switches & (rng.random(n_events) < P_FOLLOW_SIMILAR)
        _follow_neighbours(item, follows, position, user_of, preference, _neighbours(items), rng)

        # Event type and value from how much the user likes the item.
        in_taste = taste[np.arange(n_events), category]
        shared = np.minimum(overlap[user_of, item], 3)
        logit = (LIKING_BIAS + LIKING_IN_TASTE * (in_taste > 0) + LIKING_CATEGORY_WEIGHT * in_taste
                 + LIKING_TAG * shared + rng.normal(0, LIKING_NOISE, n_events))
        liking = 1 / (1 + np.exp(-logit))
        mixture = liking[:, None] * EVENT_MIX_LIKED + (1 - liking[:, None]) * EVENT_MIX_DISLIKED
        event_type = _sample_rows(mixture, rng.random(n_events))
        event_name = np.array(EVENT_TYPES, dtype=object)[event_type]
        value = np.full(n_events, np.nan)
        is_rating, is_view, is_click = (event_name == "rating"), (event_name == "view"), (event_name == "click")
        stars = np.round(2 * (1.0 + 4.0 * liking + rng.normal(0, 0.5, n_events))) / 2
        value[is_rating] = np.clip(stars, *RATING_RANGE)[is_rating]
        view_dwell = np.exp(rng.normal(2.6 + 1.2 * liking, 0.5))
        click_dwell = np.exp(rng.normal(3.4 + 1.2 * liking, 0.6))
        value[is_view] = np.round(view_dwell[is_view], 1)
        value[is_click] = np.round(click_dwell[is_click], 1)
        text = np.full(n_events, None, dtype=object)
        for e in np.flatnonzero(event_name == "review"):
            text[e] = _review(items, item[e], liking[e], rng.random())

        user_ids = np.array([_user_id(i) for i in users.index], dtype=object)[user_of]
        frame = pd.DataFrame({
            "user_id": user_ids,
            "item_id": items.ids[item],
            "event_type": event_name,
            "value": value,
            "timestamp": timestamp,
            "session_id": [f"{u}-b{batch:03d}-s{s:03d}" for u, s in zip(user_ids, session_number)],
            "text": text,
        })
        frame = frame.astype(EVENT_DTYPES)[EVENT_COLUMNS]
        # A log in time order; the stable sort keeps each user's own order among equal stamps.
        return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
