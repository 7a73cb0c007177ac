"""The record of one server round: what ``metrics.json`` shows of it.

`RoundRecord` is filled as the round goes (the schedule when it is configured,
the replies' counts as they are checked, the combined metrics at the end);
`RoundRecord.saved` turns it into the round's entry of ``metrics.json``. A
field left ``None`` is absent from that entry: it did not apply (no norm screen
ran, no update was clipped, the round was not under DP or SecAgg+). The fields
are in the order the entry shows them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flwr.app import MetricRecord


@dataclass
class RoundRecord:
    """The round in flight, as far as it went.

    Attributes
    ----------
    round, phase, learning_rate
        The round (counted over the whole run) and its schedule.
    missing_replies, train_replies, rejected_replies, skipped_images
        Train replies: nodes that did not reply, updates kept, replies rejected,
        unreadable images the nodes left out.
    update_norm_median
        The median L2 norm of the valid updates.
    secagg_dropped, secagg_clipped, update_norm_mean
        Under SecAgg+: nodes that left the protocol, nodes that clipped their
        update, the L2 norm of the unmasked mean.
    capped_claims
        Claims of ``num-examples`` the cap lowered (absent when none was).
    dp_clipped, dp_noise_std, dp_epsilon, dp_delta
        Under DP: updates the server clipped, the noise's standard deviation on
        the mean, and ε at δ spent after this round.
    model_updated
        Whether the round changed the global model.
    train_metrics, eval_metrics
        The aggregated metrics of the train and the evaluation replies.
    eval_missing_replies, eval_replies
        Evaluation replies: nodes that did not reply, replies averaged.
    started
        ``time.perf_counter()`` when the round started (not saved: its duration is).

    """

    round: int | None = None
    phase: str | None = None
    learning_rate: float | None = None
    missing_replies: int | None = None
    update_norm_median: float | None = None
    train_replies: int | None = None
    rejected_replies: int | None = None
    skipped_images: int | None = None
    secagg_dropped: int | None = None
    secagg_clipped: int | None = None
    update_norm_mean: float | None = None
    capped_claims: int | None = None
    dp_clipped: int | None = None
    dp_noise_std: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    model_updated: bool | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_missing_replies: int | None = None
    eval_replies: int | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    def entries(self) -> dict[str, Any]:
        """The fields that apply, in order, with the metrics' keys in place of their dicts."""
        entries: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, dict):
                entries.update(value)
            elif value is not None and item.name != "started":
                entries[item.name] = value
        return entries

    def saved(
        self,
        server_round: int,
        wire_stats: Mapping[str, float],
        server_metrics: MetricRecord | None,
    ) -> dict[str, Any]:
        """The round's entry of ``metrics.json``; round 0 (the start) has only its evaluation.

        ``wire_stats`` are the round's bytes and compression errors;
        ``server_metrics`` the centralised evaluation of the round's model.
        """
        saved: dict[str, Any] = {"round": server_round}
        if server_round > 0:
            saved.update({**self.entries(), **wire_stats})
            saved["round_time"] = time.perf_counter() - self.started
        if server_metrics is not None:
            saved.update({f"server_{k}": float(v) for k, v in server_metrics.items()})
        return saved
