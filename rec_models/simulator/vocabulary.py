"""The simulator's words (package data, ``vocabulary.json``): store categories with their
title patterns, themes and tags, description and review sentences."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Category:
    """Words of one store category.

    Title patterns may use ``{adj}``, ``{noun}``, ``{noun2}`` (a second, different noun),
    ``{extra}`` and ``{extra2}`` (a second, different extra word).
    """

    name: str
    kind: str  # what an item is ("novel", "cookbook", "jazz album")
    audience: str  # who it is for, in descriptions
    moods: tuple[str, ...]  # adjectives for descriptions
    adjectives: tuple[str, ...]
    nouns: tuple[str, ...]
    extras: tuple[str, ...]
    title_patterns: tuple[str, ...]
    subtitles: tuple[str, ...]  # appended after a colon when a title is already taken
    themes: tuple[str, ...]
    tags: tuple[str, ...]


_WORDS = json.loads(resources.files(__package__).joinpath("vocabulary.json").read_text(encoding="utf-8"))

CATEGORIES: tuple[Category, ...] = tuple(
    Category(**{key: value if isinstance(value, str) else tuple(value) for key, value in category.items()})
    for category in _WORDS["categories"]
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
GLOBAL_TAGS: tuple[str, ...] = tuple(_WORDS["global_tags"])
# Every tag any item can carry, in a fixed order (the columns of the tag matrices).
TAG_VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys([t for c in CATEGORIES for t in c.tags] + list(GLOBAL_TAGS)))
TAG_INDEX = {tag: i for i, tag in enumerate(TAG_VOCABULARY)}
DESCRIPTION_OPENERS: tuple[str, ...] = tuple(_WORDS["description_openers"])
DESCRIPTION_CLOSERS: tuple[str, ...] = tuple(_WORDS["description_closers"])
POSITIVE_REVIEWS: tuple[str, ...] = tuple(_WORDS["positive_reviews"])
NEGATIVE_REVIEWS: tuple[str, ...] = tuple(_WORDS["negative_reviews"])
