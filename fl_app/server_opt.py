"""What the server does with a round's combined update: FedAvg's step or a server optimiser.

TransferFedAvg validates, decodes and combines the replies (`fl_app.aggregation`,
`fl_app.privacy`) into one update Δ over the arrays that travelled; a
`ServerOptimizer` turns the global arrays ``x`` and Δ into the next global
arrays. FedAvg and FedProx take ``x + Δ``; the others are the update rules of
Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad (``flwr.serverapp.strategy``),
which cannot be reused as they are: they average the replies themselves.
``tests/test_server_opt.py`` checks each rule against Flower's strategy on the
same replies. Moments are kept per array name, so arrays that travel only in
the fine-tune phase get theirs when they first do; a frozen array's update is
zero, which leaves it where Flower's rule (on every array) would.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

# Flower's defaults where a key is 0: (server learning rate η, τ).
DEFAULTS = {
    "fedavgm": (1.0, 0.0),
    "fedadam": (0.1, 1e-9),
    "fedyogi": (0.01, 1e-3),
    "fedadagrad": (0.1, 1e-9),
}
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")

Arrays = Mapping[str, np.ndarray]


class ServerOptimizer:
    """The server's step from the combined update, with the state it keeps across rounds.

    Parameters
    ----------
    rule : str
        The run's ``strategy``: ``fedavg`` and ``fedprox`` step by the update itself.
    learning_rate : float
        η (0: Flower's default for the rule).
    momentum : float
        FedAvgM's server momentum.
    beta_1, beta_2 : float
        FedAdam's and FedYogi's moment decays (FedAdagrad has no first-moment decay).
    tau : float
        The adaptivity added to √v (0: Flower's default for the rule).

    """

    def __init__(
        self,
        rule: str = "fedavg",
        learning_rate: float = 0.0,
        momentum: float = 0.0,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 0.0,
    ) -> None:
        default_rate, default_tau = DEFAULTS.get(rule, (1.0, 0.0))
        self.rule = rule
        self.learning_rate = learning_rate or default_rate
        self.momentum = momentum
        self.beta_1 = 0.0 if rule == "fedadagrad" else beta_1
        self.beta_2 = beta_2
        self.tau = tau or default_tau
        # First and second moments (FedAvgM: the momentum vector in `first`), by array name.
        self.first: dict[str, np.ndarray] = {}
        self.second: dict[str, np.ndarray] = {}

    def step(self, server_round: int, current: Arrays, update: Arrays) -> dict[str, np.ndarray]:
        """The next global arrays for ``update``'s keys, in float64.

        ``server_round`` counts from 1 over the whole run (FedAdam's bias correction).
        """
        if self.rule == "fedavgm":
            return {key: self._momentum_step(key, current[key], update[key]) for key in update}
        if self.rule not in ADAPTIVE:
            return {key: current[key] + update[key] for key in update}
        new = {}
        rate = self.learning_rate
        if self.rule == "fedadam":
            # Flower's bias correction, with its round + 1.
            rate *= np.sqrt(1 - self.beta_2 ** (server_round + 1.0)) / (
                1 - self.beta_1 ** (server_round + 1.0)
            )
        for key, delta in update.items():
            m = self.first.get(key, np.zeros_like(delta))
            v = self.second.get(key, np.zeros_like(delta))
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            if self.rule == "fedadam":
                v = self.beta_2 * v + (1 - self.beta_2) * delta**2
            elif self.rule == "fedyogi":
                v = v - (1 - self.beta_2) * delta**2 * np.sign(v - delta**2)
            else:
                v = v + delta**2
            self.first[key], self.second[key] = m, v
            new[key] = current[key] + rate * m / (np.sqrt(v) + self.tau)
        return new

    def next_global(
        self, server_round: int, arrays: ArrayRecord, current: Arrays, update: Arrays
    ) -> ArrayRecord:
        """``arrays`` with those of ``update``'s keys stepped (`step`), each in its dtype."""
        stepped = self.step(server_round, current, update)
        # Arrays that did not travel stay the very same objects (bases share them).
        return ArrayRecord(
            {
                key: Array(stepped[key].astype(array.dtype)) if key in stepped else array
                for key, array in arrays.items()
            }
        )

    def _momentum_step(self, key: str, current: np.ndarray, delta: np.ndarray) -> np.ndarray:
        # Flower's (PyTorch's) convention: the pseudo-gradient is minus the update, and the
        # first round's momentum vector is that gradient itself.
        gradient = -delta
        if self.momentum > 0:
            previous = self.first.get(key)
            gradient = gradient if previous is None else self.momentum * previous + gradient
            self.first[key] = gradient
        return current - self.learning_rate * gradient

    def settings(self, proximal_mu: float = 0.0) -> str:
        """The rule's hyper-parameters, for the strategy's log line (FedProx's are the nodes')."""
        if self.rule == "fedprox":
            return f": proximal mu {proximal_mu:g} on the nodes"
        if self.rule == "fedavgm":
            return f": server learning rate {self.learning_rate:g}, momentum {self.momentum:g}"
        if self.rule in ("fedadam", "fedyogi"):
            return (
                f": server learning rate {self.learning_rate:g}, beta_1 {self.beta_1:g}, "
                f"beta_2 {self.beta_2:g}, tau {self.tau:g}"
            )
        if self.rule == "fedadagrad":
            return f": server learning rate {self.learning_rate:g}, tau {self.tau:g}"
        return ""

    def state(self) -> dict[str, np.ndarray]:
        """The moments, by ``first/<array>`` and ``second/<array>`` (for a checkpoint)."""
        return {
            **{f"first/{key}": value for key, value in self.first.items()},
            **{f"second/{key}": value for key, value in self.second.items()},
        }

    def load_state(self, state: Arrays) -> None:
        """Take up the moments of `state` (resuming from a checkpoint)."""
        for name, value in state.items():
            which, _, key = name.partition("/")
            {"first": self.first, "second": self.second}[which][key] = np.asarray(value)
