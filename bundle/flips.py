"""The record of kept-token flips: how many tokens a bundle's reduction steps kept differently from the
reference's (`exporter.selection` measures them; reports and saved references carry them).

Plain data, no torch: a check on the device reads the flips a saved reference recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class StepFlips:
    """One reduction step of one sample: how many kept tokens differ from the reference's."""

    tower: str  # "vision" | "decoder"
    block: int  # the block whose output it reduces
    kept: int  # |T|
    flips: int  # |T_ref \ T_bundle|, worst over the batch
    tie_flips: int  # of those, swaps between two patches with identical pixels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SelectionCheck:
    """The flips of every reduction step of one sample (vision steps, then decoder steps), and the bundle's
    kept sets as a `FollowedSelection` (None when a tower could not be probed) for the reference to follow."""

    steps: list[StepFlips]
    note: str = ""  # why some tower could not be probed
    follow: Any = None  # ficoco.reduced_llava.FollowedSelection of the bundle's choices

    @property
    def total(self) -> int:
        return sum(s.flips for s in self.steps)

    @property
    def non_tie(self) -> int:
        return sum(s.flips - s.tie_flips for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "non_tie": self.non_tie, "steps": [s.to_dict() for s in self.steps], "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionCheck:
        """A record read back from `to_dict` (without `follow`, which only the PyTorch side uses)."""
        return cls([StepFlips(**s) for s in d.get("steps", [])], str(d.get("note", "")))
