"""Secure aggregation of the train replies with Flower's SecAgg+ protocol.

The server learns only the weighted sum of the nodes' updates. Flower (1.42) ships
the protocol for its legacy API only: ``SecAggPlusWorkflow`` wants a
``LegacyContext`` and a legacy strategy, and ``secaggplus_mod`` a legacy ``FitRes``
reply. Here the workflow's four stage methods run one round's train messages, with a
stand-in for the legacy strategy that names the sampled nodes and catches the
unmasked result (`fl_app.secagg.protocol`); on the node, `fl_app.secagg.node`'s
``secagg_mod`` turns fl_app's train reply into the clipped update in the ``FitRes``
layout Flower's mod masks; `fl_app.secagg.server` is what the strategy does with a
round under SecAgg+: run it in place of the train exchange, then check the unmasked
mean as a whole. This module holds what both sides share.

What this depends on in Flower is pinned in pyproject (``flwr>=1.42,<1.43``) and
tested (tests/test_secagg.py): the stage methods and ``WorkflowState``, the
``secaggplus_configs`` record and its ``masked_parameters`` key, and the legacy
record layout of ``FitIns``/``FitRes``.
"""

from __future__ import annotations

from fl_app.config import RunConfig

# The reply metric that says whether the node had to clip its update.
CLIPPED = "secagg_clipped"
# fl_app's record, in every stage message and in the node's state: the round a stage
# belongs to. Flower's mod keeps no round, so a stage message that arrives after its
# round moved on would advance the node's state for the next round.
ROUND_RECORD = "fl_app.secagg"


def update_bound(config: RunConfig) -> float:
    """The L2 norm a node clips its update to: ``dp-clip`` under ``dp=client``."""
    return config.dp_clip if config.dp == "client" else config.secagg_clipping_range
