"""The registry itself: `RecurrentKind` and the functions that add and find kinds.

Apart from the package's ``__init__`` so that each kind module imports it without importing the
package that imports the kind modules (no import circle).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from . import quantities


@dataclasses.dataclass(frozen=True)
class RecurrentKind:
    """One kind of recurrent layer.

    Attributes:
        name: the registry key ("lstm").
        label: how messages name it ("LSTM").
        quantities: what it can expose, in output order (rows of `quantities.QUANTITIES`, or a
            custom cell's numbered states).
        state_index: the quantities that are recurrent states -> their index in the cell's
            (flattened) state list. On masked steps they hold the carried state.
        recurrent: what a requested ``c`` or ``h`` that it lacks means (its recurrent state).
        layer: backend attribute of the Keras layer class that builds this cell itself
            ("LSTM"), or None.
        cell: backend attribute of the Keras cell class ("LSTMCell"), or None (matched otherwise).
        traced_cell: backend attribute of the traced cell that replaces it ("TracedLSTMCell").
        standalone_cell: whether Keras runs the cell in a plain ``RNN`` (ConvLSTMCell: no).
        weight_roles: the cell's weights by role, in the order they are copied; a trailing
            "bias" is skipped when the cell has ``use_bias=False``. Empty: copied in order.
        step: the step math, ``step(ops, cell, inputs, states, recurrent_input, edit) ->
            {quantity: tensor}`` (every quantity of the kind, one step), written against the
            backend's ``ops`` (``keras.ops`` names) and the Keras cell's own weights and
            activations, so it runs under every flavour; the traced cells of
            `lstm_rewrite.layers.cells` call it. Its arguments:

            - ``ops``: the op namespace.
            - ``cell``: the (traced) Keras cell whose weights it reads.
            - ``inputs``: the step's input, after input dropout (``[batch, features]``; a
              ConvLSTM's ``[batch, *spatial, channels]``).
            - ``states``: the previous states, in the Keras cell's order; a step reads only those
              it needs, in the shape it computes with (an LSTM or ConvLSTM reads c, a GRU h).
            - ``recurrent_input``: the previous h after recurrent dropout, what the recurrent
              kernel multiplies (shaped like the state).
            - ``edit``: ``edit(quantity, value) -> value``, applied to each quantity where the step
              computes it, before it feeds the next (gates before c, c before h); an identity
              without interventions, so it adds no op.

            None for kinds that run their cell as it is (stacked, generic).
        fast_path: the name of a faster replacement ``method=`` may choose ("reconstruct"), or None.
        numbered: whether its quantities are the numbered states of the cell (a custom cell).
        spatial: whether its states are feature maps (ConvLSTM): the traced cell is told the call's
            state shape, and an exposed output's ``units`` counts the cell's filters.
        stacks: whether its cell holds other cells (``cell.cells``), each exposed as its own kind
            under ``cell0.``, ``cell1.``, ... (StackedRNNCells).
        copies_cell: whether the traced cell runs a copy of the user's cell (a custom cell, whose
            step only its own code knows) rather than being rebuilt from the cell's config.
        split_outputs: whether its traced cell may hand the loop a step's parts apart instead of
            concatenated (cheaper); never when the layer is unrolled, where Keras stacks one
            tensor per step.
        dropout_draws: how many dropout masks tf-keras's cell draws at once (its gates' count); the
            traced cell draws as many and uses the first, as the Keras cell does.
    """

    name: str
    label: str
    quantities: tuple
    state_index: Mapping[str, int]
    recurrent: tuple
    layer: str | None = None
    cell: str | None = None
    traced_cell: str | None = None
    standalone_cell: bool = True
    weight_roles: tuple = ("kernel", "recurrent_kernel", "bias")
    step: Callable[..., dict] | None = None
    fast_path: str | None = None
    numbered: bool = False
    spatial: bool = False
    stacks: bool = False
    copies_cell: bool = False
    split_outputs: bool = False
    dropout_draws: int = 1

    @property
    def gates(self) -> tuple:
        """What ``"gates"`` means for this kind, in output order."""
        return tuple(q for q in self.quantities if q in quantities.GATE_NAMES)

    @property
    def has_flat_step(self) -> bool:
        """Whether its traced cell runs `step` over flat ``[batch, units]`` states (LSTM, GRU,
        SimpleRNN): one traced cell class serves all such kinds, and interventions edit them."""
        return self.step is not None and not self.spatial

    @property
    def states(self) -> tuple:
        """Its quantities that are recurrent states, in output order."""
        return tuple(q for q in self.quantities if q in self.state_index)

    def with_states(self, count: int) -> "RecurrentKind":
        """A numbered kind (a custom cell) specialised to a cell with ``count`` flat states."""
        if not self.numbered:
            return self
        names = tuple(quantities.numbered_state(k) for k in range(count))
        return dataclasses.replace(self, quantities=names, recurrent=names,
                                   state_index={name: k for k, name in enumerate(names)})

    def select(self, requested) -> tuple:
        """The quantities of this kind that a parsed ``states=`` request names, in its order.

        A requested ``c`` or ``h`` it lacks means its recurrent state (`recurrent`); other names
        it lacks are skipped, so the result may be empty.
        """
        wanted = set()
        for q in requested:
            if q in self.quantities:
                wanted.add(q)
            elif q in ("c", "h"):
                wanted.update(self.recurrent)
        return tuple(q for q in self.quantities if q in wanted)


_REGISTRY: dict[str, RecurrentKind] = {}


def register(kind: RecurrentKind) -> RecurrentKind:
    """Add ``kind`` to the registry (each kind module calls it once, at import)."""
    if kind.name in _REGISTRY:
        raise ValueError(f"recurrent kind {kind.name!r} is registered twice")
    _REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> RecurrentKind:
    """The registered kind called ``name``.

    Raises:
        KeyError: naming the registered kinds.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no recurrent kind {name!r}; registered: {sorted(_REGISTRY)}") from None


def all_kinds() -> tuple:
    """Every registered kind, in registration order."""
    return tuple(_REGISTRY.values())


def kinds_with(quantity: str) -> tuple:
    """The names of the kinds that can expose ``quantity``."""
    return tuple(k.name for k in _REGISTRY.values()
                 if quantity in k.quantities or (k.numbered and quantities.is_numbered_state(quantity)))
