"""Training losses chosen by name (``SASRecConfig.loss``): full softmax and sampled softmax."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# --- losses: (hidden [N, d], targets [N], item_reps [n+1, d], candidates [n+1] bool,
#              n_negatives, negatives=None) -> scalar. ``candidates`` marks the items allowed in
#              the softmax; a loss in SAMPLED_LOSSES draws ``negatives`` itself unless given
#              (indices into item_reps: the trainer may pass a table of only the rows it needs).


def full_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_reps: torch.Tensor,
    candidates: torch.Tensor,
    n_negatives: int,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over all candidate items."""
    logits = (hidden @ item_reps.T).masked_fill(~candidates, -math.inf)
    return F.cross_entropy(logits, targets)


def sample_negatives(candidates: torch.Tensor, n_negatives: int) -> torch.Tensor:
    """``n_negatives`` item indices drawn uniformly (with replacement) from ``candidates``."""
    pool = candidates.nonzero().squeeze(1)
    return pool[torch.randint(len(pool), (n_negatives,), device=pool.device)]


def sampled_softmax_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    item_reps: torch.Tensor,
    candidates: torch.Tensor,
    n_negatives: int,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the target against ``n_negatives`` uniformly sampled candidates
    (``sample_negatives``, unless ``negatives`` are given).

    The negatives are shared by the batch; a negative equal to a row's target is ignored.
    """
    if negatives is None:
        negatives = sample_negatives(candidates, n_negatives)
    positive = (hidden * item_reps[targets]).sum(dim=1, keepdim=True)
    negative = (hidden @ item_reps[negatives].T).masked_fill(
        negatives[None, :] == targets[:, None], -math.inf
    )
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": full_softmax_loss,
    "sampled": sampled_softmax_loss,
}
SAMPLED_LOSSES = {"sampled"}  # losses that read only the targets' and the negatives' rows
