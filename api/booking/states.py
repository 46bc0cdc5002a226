"""The appointment state machine: every transition is checked here and nowhere else.

    held → booked → checked_in → completed
    held → expired              (the hold ran out before payment)
    held → cancelled            (the patient gave up before paying)
    booked → cancelled | no_show

Transitions only move forward; a state nobody can leave is final.
"""

from __future__ import annotations

from typing import Final, Literal

Status = Literal["held", "booked", "checked_in", "completed", "expired", "cancelled", "no_show"]

TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    "held": frozenset({"booked", "expired", "cancelled"}),
    "booked": frozenset({"checked_in", "cancelled", "no_show"}),
    "checked_in": frozenset({"completed"}),
    "completed": frozenset(),
    "expired": frozenset(),
    "cancelled": frozenset(),
    "no_show": frozenset(),
}

# Appointments in these states keep their slot (the exclusion constraint in 0003 agrees).
HOLDS_SLOT: Final = frozenset({"held", "booked", "checked_in", "completed"})


def can_move(current: str, target: str) -> bool:
    return target in TRANSITIONS.get(current, frozenset())


def sources(target: str) -> list[str]:
    """The states from which `target` may be reached (for `UPDATE ... WHERE status = ANY(...)`)."""
    return sorted(state for state, targets in TRANSITIONS.items() if target in targets)
