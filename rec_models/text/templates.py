"""How items and users become texts: versioned templates over catalog fields, the latest
reviews per item, and users' contexts (recent items and reviews + the task objective)."""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rec_models.data import collapse_repeats, interactions

# --- texts -----------------------------------------------------------------------------------


def _field_text(value: object) -> str:
    """A field value as text: lists join with ", ", missing values (None/NaN/NA) become ""."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(text for text in map(_field_text, value) if text)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value).strip()


@dataclass(frozen=True)
class TextTemplate:
    """How a row (a catalog item, a user context) becomes the text to embed.

    ``template`` is a ``str.format``-style string over column names, e.g.
    ``"{title} | {tags}"`` (plain ``{name}`` fields, no format specs). List values (tags)
    render comma-separated; missing columns, NaN and empty values render as nothing *and drop
    the literal text just before them* (their separator or label), so an item without tags
    reads "Dune | books", not "Dune | books |". Runs of whitespace collapse to one space.
    Change ``version`` whenever ``template`` changes; ``TextTemplate.custom`` derives one from
    the template itself.
    """

    version: str
    template: str

    @classmethod
    def custom(cls, template: str, version: str | None = None) -> TextTemplate:
        """A template with ``version``, or when None one derived from the template text."""
        return cls(version=version or f"custom-{text_sha256(template)[:8]}", template=template)

    def _pieces(self) -> list[tuple[str, str | None]]:
        """(literal text, field name or None) in template order."""
        return [(literal, name) for literal, name, _, _ in string.Formatter().parse(self.template)]

    def fields(self) -> list[str]:
        """Column names the template refers to, in order of first use."""
        return list(dict.fromkeys(name for _, name in self._pieces() if name))

    def render(self, frame: pd.DataFrame) -> list[str]:
        """One text per row, in row order."""
        pieces = self._pieces()
        columns = {
            name: frame[name].tolist() if name in frame.columns else [None] * len(frame)
            for name in self.fields()
        }
        texts = []
        for row in range(len(frame)):
            parts = []
            for literal, name in pieces:
                value = _field_text(columns[name][row]) if name else ""
                if value or not name:
                    parts.append(literal + value)
            texts.append(" ".join("".join(parts).split()))
        return texts


DEFAULT_ITEM_TEMPLATE = TextTemplate(
    version="item-v2", template="{title} | {category} | {tags} | {description} | {reviews}"
)
"""Item text: catalog fields, then the item's latest reviews (``add_reviews``) when it has any.
Fields run from most to least telling, so truncation cuts reviews first."""

USER_CONTEXT_TEMPLATE = TextTemplate(
    version="user-v1", template="{recent_items} | {reviews} | Recommend what this user will enjoy next."
)
"""User text: context (recent items, newest first, then the user's own latest reviews) and
the task objective. Built by ``build_user_contexts``; lives in the item texts' space."""

REVIEW_SEPARATOR = " / "


REVIEW_EVENT = "review"
"""The event type whose texts ``add_reviews`` and user contexts take."""


def latest_texts(events: pd.DataFrame, key: str, per_key: int, event_type: str = REVIEW_EVENT) -> pd.Series:
    """The ``per_key`` newest non-empty ``text`` values of ``event_type`` events per ``key``
    (e.g. each item's latest reviews): a Series of lists, newest first, indexed by ``key``.

    Ties in timestamp keep the input order (later rows count as newer).
    """
    if "text" not in events.columns or per_key < 1:
        return pd.Series(dtype=object)
    rows = pd.DataFrame(
        {
            key: events[key].to_numpy(),
            "timestamp": events["timestamp"].to_numpy(),
            "text": events["text"].astype("string").str.strip().to_numpy(),
            "position": np.arange(len(events)),
        }
    )
    wanted = (events["event_type"] == event_type).fillna(False).to_numpy(dtype=bool)
    rows = rows[wanted & rows["text"].fillna("").ne("").to_numpy(dtype=bool)]
    rows = rows.sort_values(["timestamp", "position"], ascending=False, kind="stable")
    latest: dict = {}  # a plain loop: 15x faster than a groupby with a Python function per key (100k items)
    for owner, text in zip(rows[key].to_numpy(), rows["text"].to_numpy()):
        texts = latest.setdefault(owner, [])
        if len(texts) < per_key:
            texts.append(text)
    return pd.Series(latest, dtype=object).rename_axis(key).rename("text")


def add_reviews(catalog: pd.DataFrame, events: pd.DataFrame, per_item: int = 3) -> pd.DataFrame:
    """The catalog with a ``reviews`` column: each item's ``per_item`` latest review texts,
    newest first, joined by " / " ("" for items without reviews)."""
    reviews = latest_texts(events, "item_id", per_item).map(REVIEW_SEPARATOR.join).to_dict()
    # A plain dict lookup: mapping through an empty Series gives a float (Arrow) column
    # that cannot hold "" (MovieLens has no reviews at all).
    return catalog.assign(reviews=[reviews.get(item, "") for item in catalog["item_id"]])


def build_user_contexts(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    recent_items: int = 5,
    recent_reviews: int = 2,
    max_interactions: int | None = 5,
) -> pd.DataFrame:
    """The context of each user, as rows for ``USER_CONTEXT_TEMPLATE``.

    A user's interactions are their positive events, one per item (``rec_models.data``'s
    ``interactions`` + ``collapse_repeats``, as the ID model counts them). Only users with
    fewer than ``max_interactions`` of them are kept (None keeps every user): the ID model
    needs 5 to train and evaluate a user, so these are the users text has to cover.

    Columns: ``user_id``; ``interactions`` (their count); ``recent_items`` (list of
    "title (category)" of the ``recent_items`` latest items with a catalog entry, newest
    first); ``reviews`` (the user's ``recent_reviews`` latest review texts, newest first,
    joined by " / "). Users with neither recent items nor reviews are left out. Rows are
    sorted by user id.
    """
    columns = ["user_id", "interactions", "recent_items", "reviews"]
    positives = collapse_repeats(interactions(events))
    counts = positives.groupby("user_id").size()
    if max_interactions is not None:
        counts = counts[counts < max_interactions]
    positives = positives[positives["user_id"].isin(counts.index)]

    labels = catalog.drop_duplicates("item_id", keep="last").set_index("item_id")
    category = labels["category"] if "category" in labels else pd.Series("", index=labels.index)
    label = [f"{title} ({cat})" if cat else title for title, cat in zip(labels["title"].map(_field_text),
                                                                        category.map(_field_text))]
    item_label = pd.Series(label, index=labels.index)
    known = positives[positives["item_id"].isin(item_label.index)]
    # collapse_repeats keeps each user's rows in time order: the last rows are the newest.
    recent = known.groupby("user_id", sort=False)["item_id"].agg(
        lambda items: [item_label[item] for item in items.iloc[::-1][:recent_items]]
    )
    reviews = latest_texts(events[events["user_id"].isin(counts.index)], "user_id", recent_reviews)

    users = pd.DataFrame({"user_id": counts.index.astype(str), "interactions": counts.to_numpy(dtype=np.int64)})
    users["recent_items"] = [recent.get(user, []) for user in users["user_id"]]
    users["reviews"] = [REVIEW_SEPARATOR.join(reviews.get(user, [])) for user in users["user_id"]]
    has_context = (users["recent_items"].map(len) > 0) | (users["reviews"] != "")
    return users.loc[has_context, columns].sort_values("user_id", kind="stable").reset_index(drop=True)


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the cache key of a rendered text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
