"""The transfer schedule: which part of the model trains in a round, and how fast."""

from __future__ import annotations

from dataclasses import dataclass

from fl_app.config import RunConfig

HEAD = "head"
FINE_TUNE = "fine-tune"
PHASES = (HEAD, FINE_TUNE)


@dataclass(frozen=True)
class TransferSchedule:
    """Rounds ``1..head_rounds`` train the head on a frozen backbone at ``learning_rate``.

    Later rounds also train the backbone's last ``fine_tune_layers`` layers at
    ``fine_tune_learning_rate`` (with ``fine_tune_layers=0`` every round is a head round).
    """

    head_rounds: int
    learning_rate: float
    fine_tune_learning_rate: float
    fine_tune_layers: int

    @classmethod
    def from_config(cls, config: RunConfig) -> TransferSchedule:
        """The schedule a run config declares."""
        return cls(
            config.head_rounds,
            config.learning_rate,
            config.fine_tune_learning_rate,
            config.fine_tune_layers,
        )

    def phase(self, server_round: int) -> str:
        """``head`` or ``fine-tune``."""
        head = server_round <= self.head_rounds or self.fine_tune_layers == 0
        return HEAD if head else FINE_TUNE

    def train_config(self, server_round: int) -> dict[str, str | float]:
        """What the server decides per round and sends: the phase and its learning rate."""
        phase = self.phase(server_round)
        rate = self.learning_rate if phase == HEAD else self.fine_tune_learning_rate
        return {"phase": phase, "learning-rate": rate}
