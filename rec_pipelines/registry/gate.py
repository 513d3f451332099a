"""The promotion gate: whether a candidate may replace the champion, from both models'
metrics on the same held-out users (and their paired per-user difference)."""

from __future__ import annotations

from dataclasses import dataclass

PRIMARY_METRIC = "ndcg@10"
MIN_COLD_USERS = 20
"""Below this many cold-start users among those scored, the cold-start guard is not applied."""
NDCG_TOLERANCE = 0.002
"""Absolute NDCG@10 a candidate may lose and still be promoted (the gate's default; the held-out
evaluation stops scoring once a candidate is clearly within it)."""


def metric_key(name: str) -> str:
    """MLflow names cannot hold '@': ``ndcg@10`` is logged as ``ndcg_at_10``."""
    return name.replace("@", "_at_")


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    candidate: dict
    champion: dict | None
    paired: dict | None = None  # evaluation.paired_difference of per-user NDCG@10

    def tags(self) -> dict[str, str]:
        tags = {"promotion.decision": "promoted" if self.promoted else "rejected", "promotion.reason": self.reason}
        for key, value in (self.paired or {}).items():
            tags[f"paired.ndcg_{key}"] = f"{value:.6g}"
        for key, value in self.candidate.items():
            tags[f"candidate.{metric_key(key)}"] = f"{value:.6g}"
        for key, value in (self.champion or {}).items():
            tags[f"champion.{metric_key(key)}"] = f"{value:.6g}"
        return tags


def decide_promotion(
    candidate: dict,
    champion: dict | None,
    tolerance: float = NDCG_TOLERANCE,
    coverage_tolerance: float = 0.2,
    cold_tolerance: float = 0.01,
    min_cold_users: int = MIN_COLD_USERS,
    paired: dict | None = None,
    significance_z: float = 1.645,
    max_relative_shortfall: float = 0.1,
) -> PromotionDecision:
    """The gate. ``candidate``/``champion`` hold protocol metrics on the same held-out data.

    Promote when NDCG@10 is not worse than the champion's beyond ``tolerance`` (absolute) and
    the guard metrics did not regress: coverage@10 may lose at most ``coverage_tolerance``
    (relative), and NDCG@10 on the cold-start users (test item unseen in training; counted only
    when at least ``min_cold_users`` of them) at most ``cold_tolerance`` (absolute).

    ``paired`` (``evaluation.paired_difference`` of the two models' per-user NDCG@10) makes the
    NDCG rule noise-aware: a shortfall beyond ``tolerance`` rejects the candidate only when it
    is also significant, i.e. ``diff + significance_z * se < 0`` (one-sided, 95 % by default).
    On a few thousand users the NDCG of two equally good models differs by about as much as
    the tolerance, so without this a fine-tune would be rejected at random; a truly worse model
    (e.g. a degraded one) is still rejected. Noise never excuses more than
    ``max_relative_shortfall`` (10 % of the champion's NDCG): on a small held-out set nothing is
    significant, and a model that much worse is not promoted on a shrug. ``significance_z = 0``
    restores the plain rule.
    """
    decision = _decide(candidate, champion, tolerance, coverage_tolerance, cold_tolerance, min_cold_users,
                       paired, significance_z, max_relative_shortfall)
    decision.paired = paired if champion is not None else None
    return decision


def _decide(candidate, champion, tolerance, coverage_tolerance, cold_tolerance, min_cold_users, paired,
            significance_z, max_relative_shortfall) -> PromotionDecision:
    if champion is None:
        return PromotionDecision(True, "no champion yet", candidate, None)
    new, old = candidate[PRIMARY_METRIC], champion[PRIMARY_METRIC]
    noise = ""
    if new < old - tolerance:
        excusable = (paired is not None and significance_z > 0 and new >= old * (1 - max_relative_shortfall)
                     and paired["diff"] + significance_z * paired["se"] >= 0)
        if not excusable:
            significance = (f"; paired difference {paired['diff']:+.4f} ± {paired['se']:.4f} over {paired['users']} users"
                            if paired else "")
            return PromotionDecision(
                False, f"{PRIMARY_METRIC} {new:.4f} is worse than champion {old:.4f} beyond tolerance {tolerance}"
                f"{significance}", candidate, champion)
        noise = (f" (shortfall not significant: paired difference {paired['diff']:+.4f} ± {paired['se']:.4f}, "
                 f"z {significance_z})")
    cov_new, cov_old = candidate.get("coverage@10", 0.0), champion.get("coverage@10", 0.0)
    if cov_new < cov_old * (1 - coverage_tolerance):
        return PromotionDecision(
            False, f"coverage@10 {cov_new:.4f} fell more than {coverage_tolerance:.0%} below champion {cov_old:.4f}",
            candidate, champion)
    cold_users = min(candidate.get("cold_users", 0), champion.get("cold_users", 0))
    if cold_users >= min_cold_users:
        cold_new, cold_old = candidate["cold_ndcg@10"], champion["cold_ndcg@10"]
        if cold_new < cold_old - cold_tolerance:
            return PromotionDecision(
                False, f"cold-start ndcg@10 {cold_new:.4f} is worse than champion {cold_old:.4f} "
                f"beyond tolerance {cold_tolerance} ({cold_users} cold users)", candidate, champion)
    return PromotionDecision(
        True, f"{PRIMARY_METRIC} {new:.4f} vs champion {old:.4f} (tolerance {tolerance}){noise}; guard metrics passed",
        candidate, champion)


