"""Online metrics: what served lists (impressions) earned from the feedback that followed them.

A served list is one answered request row (``request_id``). A feedback event is attributed to
a list when it names the list's ``request_id`` and one of its items, or else when the same user
acts on one of the list's items within ``window_s`` seconds after it was served (the latest
such list). Per list: clicked (any attributed event of a click type), converted (an attributed
purchase) and the reciprocal rank of the first clicked item (0 when none). Aggregated per model
version, arm and time window: CTR@k and conversion rate with Wilson 95 % intervals, mean
reciprocal rank with a normal 95 % interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CLICK_TYPES = ("click", "like", "purchase", "review", "rating")
Z95 = 1.959964


def wilson(successes: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion (vectorised)."""
    successes, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.nan_to_num(centre - half), np.nan_to_num(centre + half)


def attribute(impressions: pd.DataFrame, events: pd.DataFrame, window_s: int = 3600,
              click_types: tuple[str, ...] = CLICK_TYPES) -> pd.DataFrame:
    """One row per served list: request_id, user_id, model_version, arm, timestamp, k,
    clicked, converted, reciprocal_rank."""
    impressions = impressions.astype({"timestamp": "int64", "rank": "int64"})
    lists = impressions.groupby("request_id", sort=False).agg(
        user_id=("user_id", "first"), model_version=("model_version", "first"), arm=("arm", "first"),
        timestamp=("timestamp", "first"), k=("rank", "max")).reset_index()
    hits = _attributed(impressions, events[events["event_type"].isin(click_types)], window_s)
    buys = _attributed(impressions, events[events["event_type"] == "purchase"], window_s)
    first = hits.groupby("request_id")["rank"].min()
    lists["clicked"] = lists["request_id"].isin(first.index)
    lists["converted"] = lists["request_id"].isin(buys["request_id"])
    lists["reciprocal_rank"] = 1.0 / lists["request_id"].map(first).astype(float)
    lists["reciprocal_rank"] = lists["reciprocal_rank"].fillna(0.0)
    return lists


def _attributed(impressions: pd.DataFrame, events: pd.DataFrame, window_s: int) -> pd.DataFrame:
    """(request_id, rank) of impressions an event is attributed to, once per impression."""
    columns = ["request_id", "rank"]
    if not len(events) or not len(impressions):
        return pd.DataFrame(columns=columns)
    events = events[["user_id", "item_id", "timestamp", *(["request_id"] if "request_id" in events else [])]]
    events = events.astype({"timestamp": "int64"})
    by_id = pd.DataFrame(columns=columns)
    if "request_id" in events:
        named = events[events["request_id"].notna()]
        by_id = named.merge(impressions, on=["request_id", "item_id"], suffixes=("", "_served"))[columns]
        events = events[events["request_id"].isna()].drop(columns="request_id")
    # The latest list that showed the item to the user at most window_s before the event.
    left = events.assign(user_id=events["user_id"].astype(str), item_id=events["item_id"].astype(str)) \
        .sort_values("timestamp", kind="stable")
    right = impressions.assign(user_id=impressions["user_id"].astype(str), item_id=impressions["item_id"].astype(str))
    right = right.rename(columns={"timestamp": "served_at"}).sort_values("served_at", kind="stable")
    matched = pd.merge_asof(left, right[["user_id", "item_id", "served_at", "request_id", "rank"]],
                            left_on="timestamp", right_on="served_at", by=["user_id", "item_id"],
                            direction="backward", tolerance=window_s).dropna(subset=["request_id"])
    both = pd.concat([by_id, matched[columns]], ignore_index=True)
    return both.drop_duplicates().astype({"rank": "int64"})


def interleaving_wins(impressions: pd.DataFrame, events: pd.DataFrame, window_s: int = 3600,
                      click_types: tuple[str, ...] = CLICK_TYPES) -> dict | None:
    """Team-draft interleaving: per interleaved list (items of both arms), which arm's items
    got more attributed clicks. Returns wins, losses and ties of the challenger, its preference
    (wins - losses) / (wins + losses) and a sign-test z; None without interleaved lists."""
    mixed = impressions.groupby("request_id")["arm"].nunique()
    mixed = mixed[mixed > 1].index
    if not len(mixed):
        return None
    served = impressions[impressions["request_id"].isin(mixed)].astype({"rank": "int64"})
    hits = _attributed(served, events[events["event_type"].isin(click_types)], window_s)
    credited = hits.merge(served[["request_id", "rank", "arm"]], on=["request_id", "rank"])
    per_list = credited.pivot_table(index="request_id", columns="arm", values="rank", aggfunc="size", fill_value=0)
    per_list = per_list.reindex(index=mixed, columns=["champion", "challenger"], fill_value=0)
    wins = int((per_list["challenger"] > per_list["champion"]).sum())
    losses = int((per_list["challenger"] < per_list["champion"]).sum())
    decided = wins + losses
    return {"lists": len(mixed), "wins": wins, "losses": losses, "ties": len(mixed) - decided,
            "preference": (wins - losses) / decided if decided else 0.0,
            "z": (wins - losses) / math.sqrt(decided) if decided else 0.0}


def summarize(lists: pd.DataFrame, bucket_s: int | None = 3600) -> pd.DataFrame:
    """Per model version, arm and (when ``bucket_s``) time window: lists, CTR@k, conversion and
    MRR with 95 % intervals."""
    keys = ["model_version", "arm"]
    frame = lists.assign(model_version=lists["model_version"].fillna("?").astype(str))
    if bucket_s:
        frame = frame.assign(window_start=(frame["timestamp"] // bucket_s) * bucket_s)
        keys.append("window_start")
    grouped = frame.groupby(keys, sort=True)
    table = grouped.agg(lists=("request_id", "size"), clicks=("clicked", "sum"), conversions=("converted", "sum"),
                        mrr=("reciprocal_rank", "mean"), mrr_sd=("reciprocal_rank", "std"),
                        k=("k", "median")).reset_index()
    table["ctr"] = table["clicks"] / table["lists"]
    table["ctr_lo"], table["ctr_hi"] = wilson(table["clicks"], table["lists"])
    table["conversion"] = table["conversions"] / table["lists"]
    table["conversion_lo"], table["conversion_hi"] = wilson(table["conversions"], table["lists"])
    half = Z95 * table["mrr_sd"].fillna(0.0) / np.sqrt(table["lists"])
    table["mrr_lo"], table["mrr_hi"] = (table["mrr"] - half).clip(lower=0), table["mrr"] + half
    return table.drop(columns="mrr_sd")


def challenger_not_worse(lists: pd.DataFrame, champion_version: str, challenger_version: str,
                         min_lists: int, z: float = 1.645) -> tuple[bool | None, str]:
    """Whether the challenger's CTR is not significantly below the champion's (one-sided
    two-proportion z-test); None when either has fewer than ``min_lists`` served lists."""
    def arm(version: str) -> pd.Series:
        return lists.loc[lists["model_version"].astype(str) == str(version), "clicked"]

    ours, theirs = arm(challenger_version), arm(champion_version)
    if len(ours) < min_lists or len(theirs) < min_lists:
        return None, (f"not enough impressions yet: challenger {len(ours)}, champion {len(theirs)} lists "
                      f"(need {min_lists} each)")
    p1, p0 = ours.mean(), theirs.mean()
    pooled = (ours.sum() + theirs.sum()) / (len(ours) + len(theirs))
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / len(ours) + 1 / len(theirs)), 1e-12))
    score = (p1 - p0) / se
    verdict = bool(score > -z)
    return verdict, (f"online CTR challenger {p1:.4f} ({len(ours)} lists) vs champion {p0:.4f} ({len(theirs)} lists), "
                     f"z = {score:+.2f}: {'not worse' if verdict else 'worse'}")


def online_figure(table: pd.DataFrame):
    """CTR per time window for each model version and arm, with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for (version, arm), part in table.groupby(["model_version", "arm"]):
        x = pd.to_datetime(part["window_start"], unit="s") if "window_start" in part else np.arange(len(part))
        ax.errorbar(x, part["ctr"], yerr=[part["ctr"] - part["ctr_lo"], part["ctr_hi"] - part["ctr"]],
                    marker="o", capsize=3, label=f"v{version} ({arm})")
    ax.set_ylabel("CTR@k (lists with a click)")
    ax.set_title("Online click-through per model version, 95 % intervals")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig
