"""Names: the one place where exposed-output names are built and parsed.

An output name is a dotted path:
``[<model>.]<layer>[.callK][.forward|.backward][.cellK].<quantity>``, e.g. ``encoder.c``,
``bi.backward.h``, ``shared.call1.c``, ``body.inner.c``, ``gru.z``, ``stack.cell1.c``. Dots survive
saving in both Keras flavours; ``/`` does not (Keras 3 refuses it in layer names). The quantity
names come from the table of quantities (`lstm_rewrite.kinds.quantities`).
"""

from __future__ import annotations

from . import kinds
from .errors import InvalidArgumentError
from .kinds import quantities

MASK = "mask"
# What ``states=`` accepts besides a quantity's name: every gate (each layer then exposes its own).
GATES = "gates"


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
    """Normalise a ``states=`` argument to quantity names, in the table's order.

    Names: every quantity of `lstm_rewrite.kinds.quantities.QUANTITIES` (``c``, ``h``, the gates), a
    custom cell's ``state0, state1, ...``; ``"gates"`` stands for every gate name (each layer then
    exposes its own gates). A single string is one name. What a request means for one layer is
    `lstm_rewrite.kinds.RecurrentKind.select`.

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
        if state == GATES:
            wanted.update(quantities.GATE_NAMES)
        elif isinstance(state, str) and quantities.is_known(state):
            wanted.add(state)
        else:
            raise InvalidArgumentError(
                f"Unknown state {state!r}: {_what_layers_expose()}. Use e.g. states=('c', 'h', {GATES!r}). "
                f"Received: states={tuple(states)!r}"
            )
    if not wanted:
        raise InvalidArgumentError(f"states= names nothing to expose. Received: states={tuple(states)!r}")
    return tuple(sorted(wanted, key=quantities.order_key))


def _what_layers_expose() -> str:
    """The valid ``states=`` names, read off the table and the registry, for error messages."""
    named = [quantities.describe(q.name) for q in quantities.QUANTITIES if not q.is_gate]
    gates = {}  # the gates of each kind that has any, kinds with the same gates named together
    for kind in kinds.all_kinds():
        if kind.gates:
            gates.setdefault(kind.gates, []).append(kind.label)
    gate_lists = "; ".join(f"{' and '.join(labels)}: {', '.join(quantities.describe(g) for g in names)}"
                           for names, labels in gates.items())
    first, second = quantities.numbered_state(0), quantities.numbered_state(1)
    return (f"a recurrent layer exposes {', '.join(named)}, its gates ({gate_lists}; {GATES!r} means each "
            f"layer's own gates), and a custom cell its states {first}, {second}, ...")
