"""Traced cells: the Keras steps that also emit their states and gates, one class per kind.

A traced cell returns one flat tensor per step, ``concat([output, *extras])`` along the last axis
(Keras 3's ``RNN`` needs an integer ``cell.output_size``), which `TracedRNN` slices (and, for
convolutional cells, reshapes) afterwards. Its state list is left exactly as the Keras cell keeps
it, so the recurrence is unchanged. The built-in cells run their kind's step
(`lstm_rewrite.kinds`, ``RecurrentKind.step``); `TracedCell` runs a custom cell as it is.

Each class here is written against ``self.flavour`` (`Flavour`) and bound to a flavour's Keras
cell class by `lstm_rewrite.layers.bind` (``TracedLSTMCell`` over ``LSTMCell``, ...).
"""

from __future__ import annotations

import inspect
import math

from .. import kinds
from ..kinds import quantities
from . import edits

# The traced cells' registered names (also what a legacy .h5 config calls them): one per kind.
TRACED_CELLS = tuple(kind.traced_cell for kind in kinds.all_kinds())


def traced_cells(flavour) -> dict:
    """The flavour's traced cell classes by name: what their configs name when loaded."""
    return {name: flavour.classes[name] for name in TRACED_CELLS}


class TracedStepCell:
    """A built-in Keras cell (LSTM, GRU, SimpleRNN) running its kind's step and emitting
    ``concat([h, *extras])`` as its output.

    One class for every kind whose step is flat (``RecurrentKind.step``, not ``spatial``): `bind`
    makes one per kind over that kind's Keras cell (``TracedLSTMCell`` over ``LSTMCell``, ...) and
    gives it its ``kind``. ``extras`` names, in order, the quantities appended after h (any of the
    kind's). The state list is the Keras cell's own (``[h, c]``, ``[h]``), so the recurrence is
    unchanged.

    With ``split_outputs`` (kinds that allow it) the step returns the tuple ``(h, *extras)``
    instead: the RNN loop then keeps one sequence per part (`TracedRNN` takes both layouts).
    ``output_size`` still describes the concatenation, which is what shape inference sees.
    """

    kind = None  # the RecurrentKind, set per class by `lstm_rewrite.layers.bind`

    def __init__(self, units, extras=(), split_outputs=False, edits=(), input_width=None, **kwargs):
        super().__init__(units, **kwargs)
        self.extras = tuple(extras)
        self.split_outputs = bool(split_outputs) and self.kind.split_outputs
        # Whether this call's loop may keep the parts apart (`TracedRNN` decides per call).
        self.emit_split = True
        self.edits = [dict(e) for e in (edits or ())]
        self.input_width = input_width
        # The Keras cell assigns output_size in __init__; widen it to hold h and every extra.
        self.output_size = self.units * (1 + len(self.extras))
        self.step_output_size = self.units
        # The new states, in the Keras cell's order: [h, c] for an LSTM, [h] for a GRU.
        self._state_order = sorted(self.kind.state_index, key=self.kind.state_index.get)

    def build(self, input_shape):
        super().build(edits.edited_input_shape(self, input_shape))

    def call(self, inputs, states, training=False):
        ops = self.flavour.ops
        listed = isinstance(states, (list, tuple))
        previous = list(states) if listed else [states]
        inputs, t, channels = edits.split_edit_inputs(self, inputs)
        inputs, h_in = self.flavour.dropout_masks(self, inputs, previous[0], training, self.kind.dropout_draws)
        found = self.kind.step(ops, self, inputs, previous, h_in, edits.step_editor(ops, self, t, channels))
        new_states = [found[q] for q in self._state_order]
        parts = [found["h"]] + [found[q] for q in self.extras]
        if self.split_outputs and self.emit_split:
            # Concatenating every step and slicing the sequence apart afterwards cost two
            # passes over all the exposed states: up to 1.6x the LSTM's time with every gate.
            output = tuple(parts)
        else:
            output = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
        return output, (new_states if listed else new_states[0])

    def get_config(self):
        config = {**super().get_config(), "extras": list(self.extras), **edits.edit_config(self)}
        if self.kind.split_outputs:
            config["split_outputs"] = self.split_outputs
        return config


class TracedConvLSTMCell:
    """The Keras ConvLSTM step over flat states, emitting ``concat([flat(h), *flat(extras)])``.

    ``state_shape`` is one state's shape without the batch axis (``(*spatial, filters)``, or
    ``(filters, *spatial)`` for channels_first). The states travel flattened to
    ``[batch, prod(state_shape)]`` so that the generic ``RNN`` of both flavours can run the
    cell; `TracedRNN` flattens initial states and reshapes every sequence back.
    """

    kind = kinds.get("conv_lstm")

    def __init__(self, rank, filters, kernel_size, extras=(), state_shape=(), **kwargs):
        super().__init__(rank, filters, kernel_size, **kwargs)
        self.extras = tuple(extras)
        self.state_shape = tuple(int(d) for d in state_shape)
        self.state_width = math.prod(self.state_shape)
        self.state_size = [self.state_width, self.state_width]
        self.output_size = self.state_width * (1 + len(self.extras))
        self.step_output_size = self.state_width

    def build(self, input_shape, *args, **kwargs):
        # A reloaded model builds from a JSON list; the Keras cell concatenates it to a tuple.
        super().build(tuple(input_shape), *args, **kwargs)

    def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
        dtype = dtype or self.compute_dtype
        return [self.flavour.ops.zeros((batch_size, self.state_width), dtype=dtype) for _ in range(2)]

    def call(self, inputs, states, training=False):
        ops = self.flavour.ops
        shape = (-1,) + self.state_shape
        # Dropout on the flat h: the RNN prepares the recurrent dropout mask from the flat state.
        inputs, h_in = self.flavour.dropout_masks(self, inputs, states[0], training, 4)
        # The step reads c and the dropped-out h, in the state's shape (h itself it does not read).
        found = self.kind.step(ops, self, inputs, [states[0], ops.reshape(states[1], shape)],
                               ops.reshape(h_in, shape), edits.unedited)
        flat = [ops.reshape(t, (-1, self.state_width)) for t in [found["h"]] + [found[q] for q in self.extras]]
        return ops.concatenate(flat, axis=-1), [flat[0], ops.reshape(found["c"], (-1, self.state_width))]

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "extras": list(self.extras),
                "state_shape": list(self.state_shape)}


class TracedCell:
    """Any cell following the Keras RNN cell API, run as it is, also emitting its new states.

    Wraps ``cell`` (a copy of the user's cell) and returns ``concat([output, *states])`` with
    the states flattened in order; the state list passes through untouched. Works for cells
    whose output and states are flat ``[batch, n]`` tensors.
    """

    def __init__(self, cell, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell
        self.state_size = cell.state_size
        self.state_widths = [int(s) for s in self.flavour.tree.flatten(cell.state_size)]
        output_size = getattr(cell, "output_size", None)
        self.step_output_size = int(output_size if isinstance(output_size, int) else self.state_widths[0])
        self.output_size = self.step_output_size + sum(self.state_widths)
        self.extras = tuple(quantities.numbered_state(k) for k in range(len(self.state_widths)))
        self._cell_takes_training = "training" in inspect.signature(cell.call).parameters

    def build(self, input_shape):
        if not self.cell.built:
            with self.flavour.name_scope(self.cell.name):
                self.cell.build(input_shape)
        self.built = True

    def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
        own = getattr(self.cell, "get_initial_state", None)
        if own is not None:
            try:
                return own(batch_size=batch_size)
            except TypeError:
                return own(inputs=inputs, batch_size=batch_size, dtype=dtype)
        dtype = dtype or self.compute_dtype
        return [self.flavour.ops.zeros((batch_size, width), dtype=dtype) for width in self.state_widths]

    def call(self, inputs, states, training=None):
        ops = self.flavour.ops
        kwargs = {"training": training} if self._cell_takes_training else {}
        output, new_states = self.cell(inputs, states, **kwargs)
        emitted = [output] + [ops.cast(s, output.dtype) for s in self.flavour.tree.flatten(new_states)]
        return ops.concatenate(emitted, axis=-1), new_states

    def get_config(self):
        return {**super().get_config(), "cell": self.flavour.keras.layers.serialize(self.cell)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["cell"] = cls.flavour.keras.layers.deserialize(config["cell"], custom_objects=custom_objects)
        return cls(**config)


class TracedStackedCells:
    """The step of ``StackedRNNCells`` over traced cells: each cell feeds only its own output on.

    Output: ``concat([last cell's output, *cell0 extras, *cell1 extras, ...])``. The state
    list is the stack's own, passed back in the structure the RNN handed in. (Not a
    ``StackedRNNCells`` subclass: Keras 3's RNN runs those cells itself to set up dropout,
    feeding each cell's whole output to the next.)
    """

    def __init__(self, cells, **kwargs):
        super().__init__(**kwargs)
        self.cells = list(cells)

    @property
    def state_size(self):
        return [cell.state_size for cell in self.cells]

    @property
    def output_size(self):
        return self.step_output_size + sum(c.output_size - c.step_output_size for c in self.cells)

    @property
    def step_output_size(self):
        return self.cells[-1].step_output_size

    def build(self, input_shape):
        batch = tuple(input_shape)[0]
        for cell in self.cells:
            if not cell.built:
                with self.flavour.name_scope(cell.name):
                    cell.build(input_shape)
                    cell.built = True
            input_shape = (batch, cell.step_output_size)
        self.built = True

    def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
        states = []
        for cell in self.cells:
            own = getattr(cell, "get_initial_state", None)
            if "dtype" in inspect.signature(own).parameters:
                cell_states = own(inputs=None, batch_size=batch_size, dtype=dtype or cell.compute_dtype)
            else:
                cell_states = own(batch_size=batch_size)
            states.append(list(self.flavour.tree.flatten(cell_states)))
        return states

    def call(self, inputs, states, training=None):
        tree = self.flavour.tree
        flat = tree.flatten(states)
        new_states, extras, position = [], [], 0
        for cell in self.cells:
            count = len(tree.flatten(cell.state_size))
            cell_states = list(flat[position:position + count])
            position += count
            output, cell_new = cell(inputs, cell_states, training=training)
            inputs = output[..., : cell.step_output_size]
            extras.append(output[..., cell.step_output_size:])
            new_states += tree.flatten(cell_new)
        output = self.flavour.ops.concatenate([inputs] + extras, axis=-1)
        return output, tree.pack_sequence_as(states, new_states)

    def get_config(self):
        return {**super().get_config(), "cells": [self.flavour.keras.layers.serialize(cell) for cell in self.cells]}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        known = {**traced_cells(cls.flavour), **(custom_objects or {})}
        config["cells"] = [cls.flavour.keras.layers.deserialize(c, custom_objects=known) for c in config["cells"]]
        return cls(**config)


def cells_within(cell) -> list:
    """``cell`` and every cell inside it (a traced stack's cells, a TracedCell's own cell)."""
    found = [cell]
    for sub in list(getattr(cell, "cells", [])) + ([cell.cell] if isinstance(cell, TracedCell) else []):
        found.extend(cells_within(sub))
    return found


def reset_dropout_masks(cell) -> None:
    """Reset the dropout masks of the cells inside ``cell``.

    Each RNN call resets the dropout masks of the cells it knows (a DropoutRNNCell, the cells of
    a StackedRNNCells); the cells inside a traced stack or wrapper are ours to reset, else a mask
    made for one batch would be reused for the next.
    """
    inner = list(getattr(cell, "cells", []))
    if isinstance(cell, TracedCell):
        inner.append(cell.cell)
    for sub in inner:
        for reset in ("reset_dropout_mask", "reset_recurrent_dropout_mask"):
            if callable(getattr(sub, reset, None)):
                getattr(sub, reset)()
        reset_dropout_masks(sub)
