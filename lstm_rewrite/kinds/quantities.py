"""The table of quantities: every per-step value a recurrent layer can expose, in output order.

Naming, the CLI's help, the audit, LSTMVis export and the report read this table; no other
module lists quantity names. Which kinds have a quantity is the registry's business
(`lstm_rewrite.kinds.kinds_with`).
"""

from __future__ import annotations

import dataclasses
import re

# A custom cell's states are numbered: state0, state1, ... (after every named quantity).
STATE_PREFIX = "state"
_NUMBERED = re.compile(rf"{STATE_PREFIX}(\d+)")


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One named per-step quantity.

    Attributes:
        name: its name in ``states=`` and in output names (``encoder.c``).
        meaning: a few words for help texts and reports.
        value_range: ``(low, high)`` under Keras's default activations; None for an open end.
        is_gate: whether ``"gates"`` includes it.
        saturates: whether the audit counts saturation (a sigmoid gate, near 0 or 1).
    """

    name: str
    meaning: str
    value_range: tuple
    is_gate: bool = False
    saturates: bool = False


UNBOUNDED = (None, None)
UNIT_INTERVAL = (0.0, 1.0)
SIGNED_INTERVAL = (-1.0, 1.0)

QUANTITIES = (
    Quantity("c", "cell state", UNBOUNDED),
    # h is o * tanh(c) for an LSTM, a convex mix of tanh candidates for a GRU, tanh for SimpleRNN.
    Quantity("h", "hidden state", SIGNED_INTERVAL),
    Quantity("i", "input gate", UNIT_INTERVAL, is_gate=True, saturates=True),
    Quantity("f", "forget gate", UNIT_INTERVAL, is_gate=True, saturates=True),
    Quantity("g", "candidate", SIGNED_INTERVAL, is_gate=True),
    Quantity("o", "output gate", UNIT_INTERVAL, is_gate=True, saturates=True),
    Quantity("z", "update gate", UNIT_INTERVAL, is_gate=True, saturates=True),
    Quantity("r", "reset gate", UNIT_INTERVAL, is_gate=True, saturates=True),
    Quantity("n", "candidate", SIGNED_INTERVAL, is_gate=True),
)
BY_NAME = {q.name: q for q in QUANTITIES}
ORDER = tuple(q.name for q in QUANTITIES)
GATE_NAMES = tuple(q.name for q in QUANTITIES if q.is_gate)
SATURATING = tuple(q.name for q in QUANTITIES if q.saturates)
# The named states, every quantity that is not a gate (c, h): what the audit histograms and
# correlates with labels, and the report tabulates.
STATES = tuple(q.name for q in QUANTITIES if not q.is_gate)


def numbered_state(index: int) -> str:
    """The name of a custom cell's state ``index``: ``state0``, ``state1``, ..."""
    return f"{STATE_PREFIX}{index}"


def is_numbered_state(name) -> bool:
    """Whether ``name`` is a custom cell's numbered state (``state0``, ...)."""
    return isinstance(name, str) and _NUMBERED.fullmatch(name) is not None


def is_known(name) -> bool:
    """Whether ``name`` is a quantity any kind can expose."""
    return name in BY_NAME or is_numbered_state(name)


def order_key(name: str) -> tuple:
    """Sort key: the table's order, then numbered states by number, then anything else by name."""
    if name in BY_NAME:
        return (0, ORDER.index(name), "")
    if is_numbered_state(name):
        return (1, int(name[len(STATE_PREFIX):]), "")
    return (2, 0, name)


def value_range(name: str) -> tuple:
    """``(low, high)`` of a quantity under default activations; ``(None, None)`` when unbounded
    (cell states, custom states, and anything not in the table)."""
    quantity = BY_NAME.get(name)
    return quantity.value_range if quantity is not None else UNBOUNDED


def describe(name: str) -> str:
    """``"c (cell state)"``; a numbered state reads ``"state0 (custom cell state)"``."""
    quantity = BY_NAME.get(name)
    return f"{name} ({quantity.meaning if quantity else 'custom cell state'})"
