"""Tests for rec_models.data.movielens: every layout, written as tiny folders in tmp dirs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rec_models.data.movielens import (
    MOVIELENS_TEMPLATE,
    aggregate_tags,
    detect_layout,
    load_movielens,
)
from rec_models.data.schema import CATALOG_COLUMNS, EVENT_COLUMNS, EVENT_DTYPES

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# (user, item, rating, timestamp) in file order; users 1 and 2 share timestamps (ties).
RATINGS = [
    ("1", "10", 4.0, 964982703),
    ("1", "20", 3.5, 964982703),
    ("2", "20", 5.0, 1445714994),
    ("1", "30", 0.5, 964981247),
    ("2", "10", 1.0, 1445714994),
]
# ml-100k, ml-1m and ml-10m files of whole stars: the same rows with integer ratings.
INT_RATINGS = [(u, i, float(max(int(r), 1)), t) for u, i, r, t in RATINGS]
BIG_TIMESTAMP = 1_700_000_123  # float32 would round this to a different second


def check_events(events: pd.DataFrame, ratings=RATINGS) -> None:
    assert list(events.columns) == EVENT_COLUMNS
    assert {c: str(t) for c, t in events.dtypes.items()} == EVENT_DTYPES
    assert events["event_type"].eq("rating").all()
    got = list(zip(events["user_id"], events["item_id"], events["value"], events["timestamp"]))
    assert got == [(u, i, float(r), int(t)) for u, i, r, t in ratings]  # file order, every row


def write_csv_layout(folder: Path, with_tags: bool = True) -> Path:
    folder.mkdir()
    pd.DataFrame(RATINGS, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(
        folder / "ratings.csv", index=False
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        '10,"Good, the Bad (1966)",Action|Western\n'
        "20,Amélie (2001),Comedy|Romance\n"
        "30,Nothing (2000),(no genres listed)\n"
        "40,Never Rated (1999),Drama\n",
        encoding="utf-8",
    )
    if with_tags:
        (folder / "tags.csv").write_text(
            "userId,movieId,tag,timestamp\n"
            "1,10,classic,1\n2,10,Clint,2\n3,10,Classic,3\n1,20,paris,4\n",
            encoding="utf-8",
        )
    return folder


def test_csv_layout_events_catalog_and_tags(tmp_path):
    data = load_movielens(write_csv_layout(tmp_path / "ml-latest-small"))
    assert data.layout == "csv"
    check_events(data.events)

    catalog = data.catalog.set_index("item_id")
    assert list(data.catalog.columns) == CATALOG_COLUMNS
    assert list(catalog.index) == ["10", "20", "30", "40"]  # unrated movies stay in the catalog
    assert catalog.loc["10", "title"] == "Good, the Bad (1966)"
    assert catalog.loc["20", "title"] == "Amélie (2001)"
    assert catalog.loc["10", "category"] == "Action, Western"
    assert catalog.loc["30", "category"] == ""
    # Case-insensitive tag counts, most used first, first spelling kept.
    assert catalog.loc["10", "tags"] == ["classic", "Clint"]
    assert catalog.loc["30", "tags"] == []
    assert MOVIELENS_TEMPLATE.render(data.catalog.iloc[[0]]) == [
        "Good, the Bad (1966) | Action, Western | classic, Clint"
    ]
    stats = data.stats()
    assert (stats["users"], stats["rated_items"], stats["catalog_items"], stats["ratings"]) == (2, 3, 4, 5)
    assert stats["tagged_items"] == 2


def test_csv_layout_without_tags_and_large_timestamps_stay_exact(tmp_path):
    folder = write_csv_layout(tmp_path / "ml-25m", with_tags=False)
    rows = [*RATINGS, ("3", "40", 2.0, BIG_TIMESTAMP), ("3", "99", 4.5, BIG_TIMESTAMP + 1)]
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(
        folder / "ratings.csv", index=False
    )
    data = load_movielens(folder)
    check_events(data.events, rows)
    assert data.events["timestamp"].iloc[-2] == BIG_TIMESTAMP
    assert data.catalog["tags"].map(len).sum() == 0
    # Item 99 is rated but missing from movies.csv: it is still a catalog item.
    assert data.catalog["item_id"].tolist()[-1] == "99"


def test_ml100k_layout_latin1_and_genre_flags(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in INT_RATINGS))
    flags = ["0"] * 19
    action_comedy = flags.copy()
    action_comedy[1] = action_comedy[5] = "1"
    lines = [
        "|".join(["10", "Café Society (1995)", "01-Jan-1995", "", "http://x"] + action_comedy),
        "|".join(["20", "Heat (1995)", "01-Jan-1995", "", "http://y"] + flags),
        "|".join(["30", "Unknown (1995)", "", "", ""] + ["1"] + flags[1:]),
    ]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))

    data = load_movielens(folder)
    assert data.layout == "100k"
    check_events(data.events, INT_RATINGS)
    catalog = data.catalog.set_index("item_id")
    assert catalog.loc["10", "title"] == "Café Society (1995)"
    assert catalog.loc["10", "category"] == "Action, Comedy"
    assert catalog.loc["20", "category"] == ""
    assert catalog.loc["30", "category"] == "unknown"


def test_ml100k_genre_names_come_from_u_genre(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text("1\t10\t5\t100\n")
    (folder / "u.genre").write_text("Drama|1\nNoir|0\n\n")
    (folder / "u.item").write_text("10|Film (1950)|||url|1|1\n")
    assert load_movielens(folder).catalog["category"].tolist() == ["Noir, Drama"]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_dat_layout_ml1m_and_ml10m(tmp_path, encoding):
    folder = tmp_path / f"ml-{encoding}"
    folder.mkdir()
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in INT_RATINGS))
    (folder / "movies.dat").write_bytes(
        "10::Star Wars: Episode IV (1977)::Action|Sci-Fi\n20::Café (2001)::Comedy\n30::X (1990)::Drama\n".encode(
            encoding
        )
    )
    if encoding == "utf-8":  # ml-10m also has tags.dat
        (folder / "tags.dat").write_text("1::10::space opera::1\n2::10::Space Opera::2\n5::20::a::b::3\n")

    data = load_movielens(folder)
    assert data.layout == "dat"
    check_events(data.events, INT_RATINGS)
    catalog = data.catalog.set_index("item_id")
    assert catalog.loc["10", "title"] == "Star Wars: Episode IV (1977)"
    assert catalog.loc["20", "title"] == "Café (2001)"
    assert catalog.loc["10", "category"] == "Action, Sci-Fi"
    if encoding == "utf-8":
        assert catalog.loc["10", "tags"] == ["space opera"]
        assert catalog.loc["20", "tags"] == ["a::b"]


def test_unknown_folder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a MovieLens folder"):
        detect_layout(tmp_path)


def test_aggregate_tags_limits_and_orders():
    tags = pd.DataFrame({"item_id": ["1"] * 5 + ["2"], "tag": ["b", "a", "A", " a ", "c", "  "]})
    assert aggregate_tags(tags) == {"1": ["a", "b", "c"]}
    assert aggregate_tags(tags, max_tags=1) == {"1": ["a"]}


@pytest.mark.skipif(not (SHARED_DATA / "ml-latest-small").exists(), reason="needs ../shared/data/ml-latest-small")
def test_real_ml_latest_small_matches_the_protocol_counts():
    data = load_movielens(SHARED_DATA / "ml-latest-small")
    stats = data.stats()
    assert (stats["users"], stats["rated_items"], stats["ratings"]) == (610, 9724, 100836)
    assert stats["catalog_items"] == 9742
    assert np.issubdtype(data.events["timestamp"].dtype, np.int64)
