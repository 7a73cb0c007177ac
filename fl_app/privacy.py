"""Client-level differential privacy (DP-FedAvg): clipping, noise and the ε accountant.

Each round the server releases ``(Σ clip(Δᵢ, C) + N(0, (z·C)²)) / m``: the sum of
the sampled nodes' updates, each clipped to L2 norm ``C`` (``dp-clip``), plus
Gaussian noise of ``z`` (``dp-noise-multiplier``) times the sensitivity, over the
number of nodes the server sampled, ``m``. Adding or removing one node changes
the sum by at most ``C``, so every round is a Gaussian mechanism with noise
multiplier ``z``; ``m`` is the server's own choice, public, and a node that
fails to reply only leaves its term out. Uniform weights are what make the
sensitivity ``C``: weighting by ``num-examples`` would let a node's claim scale
its influence.

The accountant (Google's dp-accounting, Rényi DP) composes one Gaussian
mechanism per round and assumes no amplification by sampling: Flower samples a
fixed number of the connected nodes, neither Poisson sampling nor over a fixed
population, so the amplification bounds that need those would not be sound.
The ε it reports holds whichever nodes are sampled, drop out or join.
`private_mean` is the server's release of a round, and what it records of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv, get_norm

from fl_app.config import RunConfig
from fl_app.round_record import RoundRecord

# Noise multipliers `noise_multiplier_for` searches between.
_LOWEST_NOISE, _HIGHEST_NOISE = 0.05, 1e4


def clip(update: Sequence[np.ndarray], bound: float) -> float:
    """Scale ``update`` in place to L2 norm at most ``bound``; its norm before.

    Flower's clip, but a zero update (a node that did not move) stays zero
    instead of dividing by its norm.
    """
    norm = get_norm(list(update))
    if norm > 0:
        clip_inputs_inplace(list(update), bound)
    return norm


def noise_std(noise_multiplier: float, bound: float, sampled: int) -> float:
    """Standard deviation of the noise on each coordinate of the averaged update."""
    return compute_stdv(noise_multiplier, bound, sampled)


def noised_mean(
    clipped_sum: Sequence[np.ndarray],
    sampled: int,
    noise_multiplier: float,
    bound: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """``(clipped_sum + N(0, (z·bound)²)) / sampled``, in float64.

    ``rng`` must be unpredictable (seeded from the OS): noise anyone can replay
    can be subtracted. Flower's noise helper draws from NumPy's global
    generator, which the run seeds for reproducible training, so it is not used.
    """
    std = noise_std(noise_multiplier, bound, sampled)
    return [
        np.asarray(total, dtype=np.float64) / sampled + rng.normal(0.0, std, np.shape(total))
        for total in clipped_sum
    ]


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` Gaussian releases of ``noise_multiplier`` (RDP)."""
    if rounds == 0:
        return 0.0
    # Deferred: scipy, 0.7 s that every deployed node's message would pay for the mod alone.
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose ε after ``rounds`` is at most ``target_epsilon``.

    Bisection on a log scale to 0.1 %; raises ``ValueError`` when even a noise
    multiplier of 10⁴ cannot keep it.
    """
    low, high = _LOWEST_NOISE, _HIGHEST_NOISE
    if epsilon(high, rounds, delta) > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon:g} after {rounds} rounds at delta {delta:g} needs a noise "
            f"multiplier above {high:g}"
        )
    if epsilon(low, rounds, delta) <= target_epsilon:
        return low
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if epsilon(middle, rounds, delta) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


class BudgetSpentError(Exception):
    """The next round would take ε past ``dp-target-epsilon``: the run ends here."""


@dataclass
class PrivacyBudget:
    """The rounds released so far with a run's noise multiplier, and what they cost.

    Attributes
    ----------
    noise_multiplier, delta : float
        The run's ``dp-noise-multiplier`` and ``dp-delta``.
    target_epsilon : float
        ``dp-target-epsilon``; 0: no limit.
    rounds : int
        Noised releases so far (kept across a resume in the checkpoint).

    """

    noise_multiplier: float
    delta: float
    target_epsilon: float = 0.0
    rounds: int = 0

    @property
    def epsilon(self) -> float:
        """ε at ``delta`` spent so far."""
        return epsilon(self.noise_multiplier, self.rounds, self.delta)

    def next_epsilon(self) -> float:
        """ε at ``delta`` after one more round."""
        return epsilon(self.noise_multiplier, self.rounds + 1, self.delta)

    def allows_another_round(self) -> bool:
        """Whether one more round stays within ``target_epsilon`` (always, without one)."""
        return not self.target_epsilon or self.next_epsilon() <= self.target_epsilon

    def check_round(self, server_round: int) -> None:
        """Raise `BudgetSpentError` when round ``server_round`` would exceed ``target_epsilon``."""
        if not self.allows_another_round():
            raise BudgetSpentError(
                f"round {server_round} would take epsilon from {self.epsilon:.3g} to "
                f"{self.next_epsilon():.3g} > dp-target-epsilon={self.target_epsilon:g} "
                f"(delta {self.delta:g}): the run stops after round {server_round - 1}"
            )

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps of it."""
        return {"rounds": self.rounds, "noise_multiplier": self.noise_multiplier}


def private_mean(
    clipped_sum: Sequence[np.ndarray],
    sampled: int,
    budget: PrivacyBudget,
    bound: float,
    rng: np.random.Generator,
    record: RoundRecord,
    server_clipped: int | None = None,
) -> list[np.ndarray]:
    """Release the noised mean of ``clipped_sum`` over ``sampled`` nodes; record ε.

    One more round of ``budget`` is spent. ``record`` gets the noise's standard
    deviation, ε and δ, and ``server_clipped``: how many updates the server had
    to clip (``None`` when it never saw them: under secure aggregation the nodes clip).
    """
    noised = noised_mean(clipped_sum, sampled, budget.noise_multiplier, bound, rng)
    budget.rounds += 1
    record.dp_clipped = server_clipped
    record.dp_noise_std = noise_std(budget.noise_multiplier, bound, sampled)
    record.dp_epsilon = budget.epsilon
    record.dp_delta = budget.delta
    return noised


def log_dp_settings(config: RunConfig) -> None:
    """Log the run's DP settings, and that the norm screen is off under DP."""
    log(
        INFO,
        "Client-level DP (dp=%s): clip %g, noise multiplier %g, δ %g, ε target %s",
        config.dp,
        config.dp_clip,
        config.dp_noise_multiplier,
        config.dp_delta,
        f"{config.dp_target_epsilon:g}" if config.dp_target_epsilon else "none",
    )
    if config.max_update_norm_ratio:
        log(
            INFO,
            "dp=%s: no norm screen (max-update-norm-ratio); the clip bounds updates",
            config.dp,
        )


def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """With ``dp=client``, clip the node's update to ``dp-clip`` before it leaves.

    It must come after ``compression_mod`` in the ClientApp's mods: it then sees
    the arrays as received and the reply before it is compressed. Flower's
    ``fixedclipping_mod`` does not fit: fl_app's train messages can carry two
    ArrayRecords (the round's arrays and a base model) and two ConfigRecords.
    """
    reply = call_next(msg, context)
    config = RunConfig.parse(context.run_config, check_files=False)
    if (
        config.dp != "client"
        or msg.metadata.message_type != "train"
        or reply.has_error()
        or "arrays" not in reply.content.array_records
    ):
        return reply
    received = msg.content["arrays"]
    returned = reply.content["arrays"]
    if list(received.keys()) != list(returned.keys()):
        raise ValueError("the reply's arrays differ from the received ones: cannot clip")
    before = [array.numpy() for array in received.values()]
    update = [
        array.numpy().astype(np.float64) - old
        for array, old in zip(returned.values(), before, strict=True)
    ]
    clip(update, config.dp_clip)
    reply.content["arrays"] = ArrayRecord(
        {
            key: Array((old + delta).astype(old.dtype))
            for key, old, delta in zip(received.keys(), before, update, strict=True)
        }
    )
    return reply
