"""Names: the one place where exposed-output names are built and parsed.

An output name is a dotted path: ``[<model>.]<layer>[.callK][.forward|.backward].<quantity>``,
e.g. ``encoder.c``, ``bi.backward.h``, ``shared.call1.c``, ``body.inner.c``. Dots survive
saving in both Keras flavours; ``/`` does not (Keras 3 refuses it in layer names).
"""

from __future__ import annotations

from .cells import GATES, LSTM_QUANTITIES
from .errors import InvalidArgumentError

MASK = "mask"


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
    """Normalise a ``states=`` argument to LSTM quantity names, in canonical order.

    ``"gates"`` stands for i, f, g, o. A single string is one name.

    Raises:
        InvalidArgumentError: on an unknown name, listing the valid ones.
    """
    if isinstance(states, str):
        states = (states,)
    wanted = set()
    for state in states:
        if state == "gates":
            wanted.update(GATES)
        elif state in LSTM_QUANTITIES:
            wanted.add(state)
        else:
            raise InvalidArgumentError(
                f"Unknown state {state!r}: an LSTM exposes c (cell state), h (hidden state) and the gates "
                f"i, f, g, o ('gates' means all four). Use e.g. states=('c', 'h', 'gates'). "
                f"Received: states={tuple(states)!r}"
            )
    if not wanted:
        raise InvalidArgumentError(f"states= names nothing to expose. Received: states={tuple(states)!r}")
    return tuple(q for q in LSTM_QUANTITIES if q in wanted)
