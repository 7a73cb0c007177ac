"""How a round's validated updates combine, and what one node may weigh.

An update is what a node returned minus what it was sent, over the arrays that
travel. ``mean`` weights updates by their ``num-examples``, each claim capped
at ``max-examples-ratio`` times the round's median claim: an honest node with
ten times the median's data keeps its weight, while a claim of 10⁹ examples
weighs no more than that. ``trimmed-mean`` and ``median`` are coordinate-wise
and unweighted (Flower's FedTrimmedAvg and FedMedian rules), so neither a
claimed count nor a few wild values move them. The norm screen rejects an
update whose L2 norm exceeds ``max-update-norm-ratio`` times the round's
median, before any rule sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from flwr.supercore.differential_privacy import get_norm

Update = list[np.ndarray]


def update_norm(update: Sequence[np.ndarray]) -> float:
    """The L2 norm of an update over all its arrays."""
    return get_norm(list(update))


def norm_outliers(norms: Sequence[float], ratio: float) -> list[bool]:
    """Which norms exceed ``ratio`` times their median (none when ``ratio`` is 0)."""
    if not ratio or not norms:
        return [False] * len(norms)
    limit = ratio * float(np.median(norms))
    return [norm > limit for norm in norms]


def capped_weights(weights: Sequence[float], ratio: float) -> list[float]:
    """``weights``, each at most ``ratio`` times their median (as they are when ``ratio`` is 0)."""
    if not ratio or not weights:
        return list(weights)
    cap = ratio * float(np.median(weights))
    return [min(weight, cap) for weight in weights]


def combine(
    updates: Sequence[Update], weights: Sequence[float], rule: str, trim_fraction: float = 0.2
) -> Update:
    """Combine ``updates`` by ``rule`` (``mean``, ``trimmed-mean`` or ``median``), in float64.

    ``weights`` count for ``mean`` only.
    """
    if rule == "median":
        return aggregate_median([(list(update), 1) for update in updates])
    if rule == "trimmed-mean":
        return aggregate_trimmed_avg([(list(update), 1) for update in updates], trim_fraction)
    if rule != "mean":
        raise ValueError(
            f"aggregation={rule!r} is not allowed: expected mean, trimmed-mean, median"
        )
    total = float(sum(weights))
    combined = [np.zeros(np.shape(array), dtype=np.float64) for array in updates[0]]
    for update, weight in zip(updates, weights, strict=True):
        for acc, array in zip(combined, update, strict=True):
            acc += (weight / total) * array
    return combined


@dataclass(frozen=True)
class Combiner:
    """A run's way of combining updates: its rule, trim, norm screen and cap on claims.

    The defaults are FedAvg's plain weighted mean, with neither screen nor cap.
    """

    rule: str = "mean"
    trim_fraction: float = 0.2
    max_update_norm_ratio: float = 0.0
    max_examples_ratio: float = 0.0

    def norm_rejections(self, norms: Sequence[float]) -> list[str | None]:
        """Why the norm screen rejects each update, by their norms (``None``: kept)."""
        limit = self.max_update_norm_ratio * float(np.median(norms)) if norms else 0.0
        return [
            f"update norm {norm:.4g} > max-update-norm-ratio x median = {limit:.4g}"
            if outlier
            else None
            for norm, outlier in zip(
                norms, norm_outliers(norms, self.max_update_norm_ratio), strict=True
            )
        ]

    def combine(self, updates: Sequence[Update], claims: Sequence[float]) -> tuple[Update, int]:
        """The combined update, and how many claims of ``num-examples`` were capped.

        ``claims`` weigh the ``mean`` only, each capped at ``max_examples_ratio``
        times their median.
        """
        if self.rule != "mean":
            return combine(updates, claims, self.rule, self.trim_fraction), 0
        weights = capped_weights(claims, self.max_examples_ratio)
        capped = sum(weight < claim for weight, claim in zip(weights, claims, strict=True))
        return combine(updates, weights, self.rule), capped
