"""MovieLens loaders for every common layout (ml-100k, ml-1m/10m, ml-20m/25m/latest): events
in file order and a catalog with titles, genres and tags (docs/data.md)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rec_models.data.schema import CATALOG_COLUMNS, EVENT_COLUMNS, EVENT_DTYPES
from rec_models.text import TextTemplate

MOVIELENS_TEMPLATE = TextTemplate(version="movielens-v1", template="{title} | {category} | {tags}")
"""Item text for MovieLens: "title | genres | tags"."""

MAX_TAGS_PER_ITEM = 10
NO_GENRES = "(no genres listed)"
# ml-100k's genre flag columns, in file order (used when u.genre is absent).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]


@dataclass
class MovieLensData:
    """Events (schema columns, file order), catalog (``schema.CATALOG_COLUMNS``), layout."""

    events: pd.DataFrame
    catalog: pd.DataFrame
    layout: str
    path: Path

    def stats(self) -> dict:
        """Raw counts: users, rated items, catalog items, ratings, tagged items, layout."""
        return {
            "path": str(self.path),
            "layout": self.layout,
            "users": int(self.events["user_id"].nunique()),
            "rated_items": int(self.events["item_id"].nunique()),
            "catalog_items": len(self.catalog),
            "ratings": len(self.events),
            "tagged_items": int((self.catalog["tags"].map(len) > 0).sum()),
        }


def detect_layout(folder: Path) -> str:
    """"csv", "100k" or "dat" from the files in ``folder``; ValueError if none matches."""
    folder = Path(folder)
    if (folder / "ratings.csv").exists():
        return "csv"
    if (folder / "u.data").exists():
        return "100k"
    if (folder / "ratings.dat").exists():
        return "dat"
    raise ValueError(
        f"{folder} is not a MovieLens folder: expected ratings.csv, u.data or ratings.dat"
    )


def load_movielens(folder: str | Path) -> MovieLensData:
    """Events and catalog of the MovieLens dataset in ``folder`` (any supported layout)."""
    folder = Path(folder)
    layout = detect_layout(folder)
    loader = {"csv": _load_csv_layout, "100k": _load_100k_layout, "dat": _load_dat_layout}[layout]
    ratings, movies, tags = loader(folder)
    return MovieLensData(_events(ratings), _catalog(movies, tags, ratings), layout, folder)


# --- layouts: each returns ratings (user_id, item_id, value, timestamp), movies
#     (item_id, title, genres: list[str]) and tags (item_id, tag) frames.


def _load_csv_layout(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = pd.read_csv(
        folder / "ratings.csv",
        dtype={"userId": str, "movieId": str, "rating": "float64", "timestamp": "int64"},
    ).rename(columns={"userId": "user_id", "movieId": "item_id", "rating": "value"})
    movies = pd.read_csv(folder / "movies.csv", dtype=str, keep_default_na=False)
    movies = pd.DataFrame(
        {
            "item_id": movies["movieId"],
            "title": movies["title"],
            "genres": [_split_genres(g) for g in movies["genres"]],
        }
    )
    tags = _empty_tags()
    if (folder / "tags.csv").exists():
        raw = pd.read_csv(folder / "tags.csv", dtype=str, keep_default_na=False)
        tags = pd.DataFrame({"item_id": raw["movieId"], "tag": raw["tag"]})
    return ratings, movies, tags


def _load_100k_layout(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = pd.read_csv(
        folder / "u.data",
        sep="\t",
        header=None,
        names=["user_id", "item_id", "value", "timestamp"],
        dtype={"user_id": str, "item_id": str, "value": "float64", "timestamp": "int64"},
    )
    genre_names = ML100K_GENRES
    if (folder / "u.genre").exists():
        lines = (folder / "u.genre").read_text(encoding="latin-1").splitlines()
        pairs = [line.rsplit("|", 1) for line in lines if "|" in line]
        genre_names = [name for name, _ in sorted(pairs, key=lambda pair: int(pair[1]))]
    items, titles, genres = [], [], []
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        flags = fields[len(fields) - len(genre_names) :]
        items.append(fields[0])
        titles.append(fields[1])
        genres.append([name for name, flag in zip(genre_names, flags) if flag.strip() == "1"])
    movies = pd.DataFrame({"item_id": items, "title": titles, "genres": genres})
    return ratings, movies, _empty_tags()


def _load_dat_layout(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    # Numbers only, so splitting on ":" gives the fields at even positions (C parser, fast).
    ratings = pd.read_csv(
        folder / "ratings.dat",
        sep=":",
        header=None,
        usecols=[0, 2, 4, 6],
        names=["user_id", "_a", "item_id", "_b", "value", "_c", "timestamp"],
        dtype={"user_id": str, "item_id": str, "value": "float64", "timestamp": "int64"},
    )[["user_id", "item_id", "value", "timestamp"]]
    rows = [line.split("::", 2) for line in _read_lines(folder / "movies.dat")]
    movies = pd.DataFrame(
        {
            "item_id": [row[0] for row in rows],
            "title": [row[1] for row in rows],
            "genres": [_split_genres(row[2]) for row in rows],
        }
    )
    tags = _empty_tags()
    if (folder / "tags.dat").exists():
        # UserID::MovieID::Tag::Timestamp, where the free-text tag may itself contain "::".
        rows = [line.split("::", 2) for line in _read_lines(folder / "tags.dat")]
        tags = pd.DataFrame(
            {"item_id": [row[1] for row in rows], "tag": [row[2].rsplit("::", 1)[0] for row in rows]}
        )
    return ratings, movies, tags


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines; UTF-8 (ml-10m) with a latin-1 fallback (ml-1m)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return [line for line in text.splitlines() if line.strip()]


def _split_genres(genres: str) -> list[str]:
    return [g for g in str(genres).split("|") if g and g != NO_GENRES]


def _empty_tags() -> pd.DataFrame:
    return pd.DataFrame({"item_id": pd.Series(dtype=str), "tag": pd.Series(dtype=str)})


# --- shared post-processing


def _events(ratings: pd.DataFrame) -> pd.DataFrame:
    n = len(ratings)
    frame = pd.DataFrame(
        {
            "user_id": ratings["user_id"].to_numpy(),
            "item_id": ratings["item_id"].to_numpy(),
            "event_type": np.full(n, "rating", dtype=object),
            "value": ratings["value"].to_numpy(dtype="float64"),
            "timestamp": ratings["timestamp"].to_numpy(dtype="int64"),
            "session_id": pd.NA,
            "text": pd.NA,
        }
    )
    return frame[EVENT_COLUMNS].astype(EVENT_DTYPES)


def aggregate_tags(tags: pd.DataFrame, max_tags: int = MAX_TAGS_PER_ITEM) -> dict[str, list[str]]:
    """Per item: its distinct tags (case-insensitive), most used first, ties in file order."""
    per_item: dict[str, Counter] = {}
    spelling: dict[tuple[str, str], str] = {}
    for item_id, tag in zip(tags["item_id"].astype(str), tags["tag"].astype(str)):
        tag = " ".join(tag.split())
        if not tag:
            continue
        key = tag.lower()
        spelling.setdefault((item_id, key), tag)
        per_item.setdefault(item_id, Counter())[key] += 1
    # Counter.most_common keeps insertion (file) order among equal counts.
    return {
        item_id: [spelling[(item_id, key)] for key, _ in counts.most_common(max_tags)]
        for item_id, counts in per_item.items()
    }


def _catalog(movies: pd.DataFrame, tags: pd.DataFrame, ratings: pd.DataFrame) -> pd.DataFrame:
    movies = movies.drop_duplicates("item_id")
    missing = pd.unique(ratings.loc[~ratings["item_id"].isin(movies["item_id"]), "item_id"])
    if len(missing):
        extra = pd.DataFrame({"item_id": missing, "title": "", "genres": [[] for _ in missing]})
        movies = pd.concat([movies, extra], ignore_index=True)
    item_tags = aggregate_tags(tags)
    catalog = pd.DataFrame(
        {
            "item_id": movies["item_id"].astype(str).to_numpy(),
            "title": movies["title"].astype(str).str.strip().to_numpy(),
            "description": "",
            "category": [", ".join(g) for g in movies["genres"]],
            "tags": [item_tags.get(str(i), []) for i in movies["item_id"]],
        }
    )
    return catalog[CATALOG_COLUMNS].reset_index(drop=True)
