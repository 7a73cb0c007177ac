"""The ServerApp's grid: replies picked up as they come, and the wait for a round's nodes.

Flower 1.42's ``send_and_receive`` (``flwr.superlink.grid.http_grid``) looks for replies
every 3 s, so every train or evaluate exchange of a round lasts a whole number of 3 s
waits even when every node answers in a fraction of a second, as on cached features in
the head phase: those waits were most of a simulated round. `PromptGrid` looks after
`FIRST_PULL` seconds and backs off by `BACKOFF` up to Flower's 3 s, so a quick exchange
ends moments after its last reply, and a long one asks the SuperLink as seldom as
Flower's does. `wait_for_nodes` waits for a round's nodes with a limit, which
Flower's sampling has not.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run

FIRST_PULL = 0.05
BACKOFF = 1.5
LONGEST_PULL = 3.0


class PromptGrid(Grid):
    """``grid``, whose `send_and_receive` pulls replies with a backoff from `FIRST_PULL`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        """Set the run of the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message from the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes' ids."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The connected nodes."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Send ``messages``; their ids."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that have come."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send ``messages`` and return their replies: all, or those in by ``timeout`` s."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_PULL
        while True:
            came = list(self.pull_messages(pending))
            replies.extend(came)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in came)
            left = None if deadline is None else deadline - time.monotonic()
            if not pending or (left is not None and left <= 0):
                return replies
            time.sleep(wait if left is None else min(wait, left))
            wait = min(wait * BACKOFF, LONGEST_PULL)


def wait_for_nodes(grid: Grid, needed: int, timeout: float) -> None:
    """Wait, within ``timeout`` s, for ``needed`` nodes to connect; ``RuntimeError`` if not.

    Flower's own sampling waits without limit, logging every second; this logs
    every 30 s.
    """
    deadline = time.monotonic() + timeout
    next_log = 0.0
    while (connected := len(list(grid.get_node_ids()))) < needed:
        now = time.monotonic()
        if now >= deadline:
            raise RuntimeError(
                f"only {connected} of the {needed} nodes needed (min-available-nodes) "
                f"are connected after wait-for-nodes-timeout={timeout:g} s"
            )
        if now >= next_log:
            log(INFO, "Waiting for nodes: %d of %d connected", connected, needed)
            next_log = now + 30
        time.sleep(1)
