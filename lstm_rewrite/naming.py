"""Names: the one place where exposed-output names are built and parsed.

An output name is a dotted path:
``[<model>.]<layer>[.callK][.forward|.backward][.cellK].<quantity>``, e.g. ``encoder.c``,
``bi.backward.h``, ``shared.call1.c``, ``body.inner.c``, ``gru.z``, ``stack.cell1.c``. Dots survive
saving in both Keras flavours; ``/`` does not (Keras 3 refuses it in layer names).
"""

from __future__ import annotations

import re

from .kinds import RecurrentKind as CellFamily
from .kinds.quantities import GATE_NAMES as ALL_GATES
from .kinds.quantities import ORDER as QUANTITY_ORDER
from .kinds.quantities import STATE_PREFIX
from .errors import InvalidArgumentError

MASK = "mask"
_STATE_NAME = re.compile(rf"{STATE_PREFIX}(\d+)")


def site_name(layer_name: str, call_index: int, prefix: str = "") -> str:
    """The dotted name of one call of a layer: ``encoder``, ``shared.call1``, ``body.inner``."""
    name = layer_name if call_index == 0 else f"{layer_name}.call{call_index}"
    return f"{prefix}{name}"


def output_name(site: str, quantity: str) -> str:
    """``site_name`` + ``.quantity``, e.g. ``bi.forward.c``."""
    return f"{site}.{quantity}"


def split_output_name(name: str) -> tuple[str, str]:
    """Inverse of `output_name`: ``"bi.forward.c"`` -> ``("bi.forward", "c")``."""
    site, _, quantity = name.rpartition(".")
    return site, quantity


def parse_states(states) -> tuple[str, ...]:
    """Normalise a ``states=`` argument to quantity names, in canonical order.

    Names: ``c`` (cell state), ``h`` (hidden state), the LSTM gates ``i, f, g, o``, the GRU
    gates ``z, r, n``, a custom cell's ``state0, state1, ...``; ``"gates"`` stands for every
    gate name (each layer then exposes its own gates). A single string is one name. What a
    request means for one layer is `quantities_for`.

    Example:
        >>> parse_states(("gates", "c"))
        ('c', 'i', 'f', 'g', 'o', 'z', 'r', 'n')

    Raises:
        InvalidArgumentError: on an unknown name, listing the valid ones.
    """
    if isinstance(states, str):
        states = (states,)
    wanted = set()
    for state in states:
        if state == "gates":
            wanted.update(ALL_GATES)
        elif state in QUANTITY_ORDER or (isinstance(state, str) and _STATE_NAME.fullmatch(state)):
            wanted.add(state)
        else:
            raise InvalidArgumentError(
                f"Unknown state {state!r}: a recurrent layer exposes c (cell state), h (hidden state), the "
                f"LSTM gates i, f, g, o, the GRU gates z, r, n ('gates' means each layer's own gates), and a "
                f"custom cell its states state0, state1, .... Use e.g. states=('c', 'h', 'gates'). "
                f"Received: states={tuple(states)!r}"
            )
    if not wanted:
        raise InvalidArgumentError(f"states= names nothing to expose. Received: states={tuple(states)!r}")
    named = [q for q in QUANTITY_ORDER if q in wanted]
    numbered = sorted((q for q in wanted if q not in QUANTITY_ORDER), key=lambda q: int(q[len(STATE_PREFIX):]))
    return tuple(named + numbered)


def quantities_for(requested, family: CellFamily) -> tuple[str, ...]:
    """The quantities of one layer (of cell ``family``) that a parsed request names, in its order.

    A requested ``c`` or ``h`` that the layer lacks means its recurrent state: ``c`` on a GRU or
    SimpleRNN gives h, and ``c`` or ``h`` on a custom cell gives every one of its states. Other
    names the layer lacks (LSTM gates on a GRU, ``state1`` on an LSTM) are skipped; the result
    may be empty, which the rewrite refuses for a selected layer.

    Example:
        >>> quantities_for(("c", "h"), GRU_FAMILY)
        ('h',)
    """
    wanted = set()
    for q in requested:
        if q in family.quantities:
            wanted.add(q)
        elif q in ("c", "h"):
            wanted.update(family.recurrent)
    return tuple(q for q in family.quantities if q in wanted)
