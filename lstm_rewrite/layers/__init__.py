"""Traced layers, written once against the backend's ops and bound to each Keras flavour.

The classes of this package's modules (`cells`, `traced_rnn`, `subclass`, `bidirectional`,
`reconstructed`) hold the layers' code; they import no framework and reach theirs through
``self.flavour``, a `Flavour`. `bind` makes one flavour's classes from them, each over that
flavour's Keras class (``TracedLSTMCell`` over ``LSTMCell``, ``TracedRNN`` over ``Layer``, ...),
and registers them for saving under the names that saved files use (package ``lstm_rewrite``).
Each backend calls it once and exposes the result (``backend.TracedLSTMCell``, ...).

Stages of a traced call: `TracedRNN` runs an inner ``RNN`` over a traced cell, whose step is its
kind's (`lstm_rewrite.kinds`), edited by `edits` where interventions ask; `masking` puts the
carried values in on masked steps; `shapes` skips the recurrence while a model is only built.
"""

from __future__ import annotations

import functools
import types

from .. import kinds
from . import bidirectional, cells, reconstructed, subclass, traced_rnn
from .flavour import Flavour, plain_python
from .shapes import shapes_only, shapes_only_active


def _keras_cell(kind):
    return lambda f: getattr(f.keras.layers, kind.cell)


# name -> (the class holding its code, its base in the flavour: a Keras class, given as a function
# of the flavour, or the name of a class bound before it, and what the class holds besides).
# Every kind with a flat step gets its traced cell from the registry: one `TracedStepCell` over
# the kind's Keras cell.
_CLASSES = {
    **{kind.traced_cell: (cells.TracedStepCell, _keras_cell(kind), {"kind": kind})
       for kind in kinds.all_kinds() if kind.has_flat_step},
    "TracedConvLSTMCell": (cells.TracedConvLSTMCell, lambda f: f.conv_lstm_cell),
    "TracedCell": (cells.TracedCell, lambda f: f.keras.layers.Layer),
    "TracedStackedCells": (cells.TracedStackedCells, lambda f: f.keras.layers.Layer),
    "TracedRNN": (traced_rnn.TracedRNN, lambda f: f.keras.layers.Layer),
    "TracedParentCall": (subclass.TracedParentCall, "TracedRNN"),
    "TracedSubclassRNN": (subclass.TracedSubclassRNN, "TracedParentCall"),
    "TracedBidirectional": (bidirectional.TracedBidirectional, lambda f: f.keras.layers.Layer),
    "ReconstructedLSTM": (reconstructed.ReconstructedLSTM, lambda f: f.keras.layers.Layer),
    "ReconstructedBidirectional": (reconstructed.ReconstructedBidirectional, "TracedBidirectional"),
}
# Internal to the subclass call (never in a saved file).
_UNREGISTERED = {"TracedParentCall"}


def bind(flavour: Flavour, module: str) -> dict:
    """Make, name and register the traced layer classes of one Keras flavour.

    Args:
        flavour: what the layers need from the flavour (`Flavour`).
        module: the name of the backend module that exposes the classes (their ``__module__``).

    Returns:
        The flavour's classes by name (also in ``flavour.classes``), with ``linear_scan`` bound to
        its ops (`reconstructed.linear_scan`).

    Example:
        >>> bound = bind(Flavour(keras=keras, ops=keras.ops, ...), __name__)
        >>> issubclass(bound["TracedLSTMCell"], keras.layers.LSTMCell)
        True
    """
    register = flavour.keras.saving.register_keras_serializable
    for name, (code, base, *held) in _CLASSES.items():
        base = flavour.classes[base] if isinstance(base, str) else base(flavour)
        namespace = {"flavour": flavour, "__module__": module, "__qualname__": name, "__doc__": code.__doc__,
                     **(held[0] if held else {})}
        # Autograph's keep-away, where the flavour has one, on the calls marked for it.
        namespace.update({attr: flavour.plain_python(value) for attr, value in vars(code).items()
                          if getattr(value, "plain_python", False)})
        bound = types.new_class(name, (code, base), exec_body=lambda ns: ns.update(namespace))
        if name not in _UNREGISTERED:
            bound = register(package="lstm_rewrite", name=name)(bound)
        flavour.classes[name] = bound
    exposed = {name: cls for name, cls in flavour.classes.items() if name not in _UNREGISTERED}
    exposed["linear_scan"] = functools.partial(reconstructed.linear_scan, ops=flavour.ops,
                                               doubling_loop=flavour.doubling_loop)
    return exposed


__all__ = ["Flavour", "bind", "plain_python", "shapes_only", "shapes_only_active"]
