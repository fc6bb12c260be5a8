"""The best validation AP of a run, for ``--save_best`` and ``--early_stop``.

The tracker lives in the checkpoint (``best_ap``, ``best_epoch``, ``evals_since_best``), so a
resumed run keeps comparing against the best epoch before the interruption.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BestTracker"]


@dataclass
class BestTracker:
    """The best AP so far and how many evaluations have not improved on it.

    Attributes:
        best_ap: the best COCO box AP (``None`` before the first evaluation).
        best_epoch: the epoch (0-based) that reached it.
        evals_since_best: evaluations since then that did not improve it.
    """

    best_ap: float | None = None
    best_epoch: int | None = None
    evals_since_best: int = 0

    def update(self, ap: float, epoch: int) -> bool:
        """Record the AP of ``epoch``'s evaluation; whether it is a new best."""
        if self.best_ap is None or ap > self.best_ap:
            self.best_ap, self.best_epoch, self.evals_since_best = float(ap), epoch, 0
            return True
        self.evals_since_best += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries."""
        return {
            "best_ap": self.best_ap,
            "best_epoch": self.best_epoch,
            "evals_since_best": self.evals_since_best,
        }

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> BestTracker:
        """The tracker a checkpoint stored (a fresh one when it has none)."""
        ap, epoch = state.get("best_ap"), state.get("best_epoch")
        if not isinstance(ap, (int, float)) or not isinstance(epoch, int):
            return cls()
        return cls(float(ap), epoch, int(state.get("evals_since_best") or 0))
