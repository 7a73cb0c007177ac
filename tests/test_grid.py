"""PromptGrid's exchange: every reply, pulled with a backoff, and no longer than the timeout.

The grid it wraps here is a stand-in whose nodes answer after a number of pulls; the
real one (Flower's SuperLink grid) runs in every simulation and deployment test.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from helpers import message_metadata

from fl_app import grid as grid_module
from fl_app.grid import BACKOFF, FIRST_PULL, LONGEST_PULL, PromptGrid


class AnswersAfter(Grid):
    """Nodes whose replies are there from the ``after``-th pull on (never, if None)."""

    def __init__(self, after: int | None) -> None:
        self.after = after
        self.pulls = 0
        self.sent: dict[str, Message] = {}

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        for msg in messages:
            self.sent[msg.metadata.message_id] = msg
        return list(self.sent)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        if self.after is None or self.pulls < self.after:
            return []
        # One reply per pull from then on, as nodes finishing one after the other.
        first = sorted(message_ids)[0]
        return [Message(RecordDict(), reply_to=self.sent[first])]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError


def messages(n: int) -> list[Message]:
    return [
        Message(RecordDict(), metadata=message_metadata(0, node, MessageType.TRAIN))
        for node in range(1, n + 1)
    ]


def test_every_reply_comes_back_with_pulls_backing_off_to_flowers_3_s(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", waits.append)
    stand_in = AnswersAfter(after=12)
    sent = messages(3)
    replies = list(PromptGrid(stand_in).send_and_receive(sent, timeout=None))

    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in sent
    )
    assert stand_in.pulls == 14  # 11 empty, then one reply each
    expected = [min(FIRST_PULL * BACKOFF**k, LONGEST_PULL) for k in range(13)]
    assert waits == pytest.approx(expected)
    assert waits[0] == FIRST_PULL and waits[-1] == LONGEST_PULL


def test_the_exchange_ends_at_its_timeout_with_the_replies_so_far():
    stand_in = AnswersAfter(after=None)
    assert list(PromptGrid(stand_in).send_and_receive(messages(2), timeout=0.3)) == []
    assert stand_in.pulls >= 2


def test_everything_else_is_the_wrapped_grids():
    stand_in = AnswersAfter(after=1)
    assert list(PromptGrid(stand_in).get_node_ids()) == [1, 2, 3]
    assert [n.node_id for n in PromptGrid(stand_in).get_nodes()] == [1, 2, 3]
