"""The replacement builder: the traced layer that stands in for one planned recurrent call.

What to build is read off the call's kind (`lstm_rewrite.kinds.RecurrentKind`): its traced cell
class (``kind.traced_cell``, a backend attribute), whether that cell is rebuilt from the Keras
cell's config or runs a copy of a custom cell (``copies_cell``), holds other cells (``stacks``),
has feature-map states (``spatial``) or may return its step's parts apart (``split_outputs``), and
the fast path it offers (``fast_path``, which may decline a layer). Every replacement is unbuilt;
its weights are copied once it is built (`lstm_rewrite.rewrite.weights`).
"""

from __future__ import annotations

from ..layers import reconstructed
from .match import copy_cell, flat_state_sizes


class ReplacementBuilder:
    """Builds the traced layer that replaces one planned recurrent call.

    Each replacement is an unbuilt `TracedRNN` (a `TracedSubclassRNN` for a subclass whose call
    wraps the Keras one, a ReconstructedLSTM on the fast path) whose exposed sequences come in the
    order the plan lists them (`PlannedLayer.cells`, then each cell's quantities), then its mask.
    """

    def __init__(self, backend, expose_masks: bool, method: str = "trace"):
        self.backend = backend
        self.expose_masks = expose_masks
        self.method = method  # "trace", or a kind's fast path ("reconstruct", for LSTMs)

    def traced_site(self, site, output_shape, edits=None):
        """The replacement of one planned call (a `RecurrentSite`).

        Args:
            site: the planned call.
            output_shape: the shape of the call's (first) output, which gives a ConvLSTM's state shape.
            edits: interventions per `PlannedLayer.traced_name` (`lstm_rewrite.rewrite.edits`).
        """
        edits = edits or {}
        if not site.bidirectional:
            return self.traced_layer(site.directions[0], output_shape, edits=edits)
        bi = site.layer
        directions = [self.traced_layer(d, output_shape, bi.return_sequences, bi.return_state, edits)
                      for d in site.directions]
        return reconstructed.bidirectional_class(self.backend, directions)(
            *directions, merge_mode=bi.merge_mode, return_sequences=bi.return_sequences,
            return_state=bi.return_state, name=bi.name, dtype=self.backend.dtype_policy(bi),
        )

    def traced_layer(self, planned, output_shape, return_sequences=None, return_state=None, edits=None):
        """The replacement of one recurrent layer (a `PlannedLayer`: a call's layer, or one direction)."""
        kind = planned.kind
        if kind.fast_path is not None and self.method == kind.fast_path:
            fast = _FAST_PATHS[kind.fast_path](self, planned, return_sequences, return_state)
            if fast is not None:
                return fast
        if kind.stacks:
            return self._traced_stack(planned, return_sequences, return_state)
        if kind.copies_cell:
            (exposed,) = planned.cells
            cell = self._traced_copy(exposed)
            return self._wrap(planned, cell, return_sequences, return_state, extras=cell.extras,
                              exposed=exposed.quantities, state_index=exposed.kind.state_index, output_alias=None,
                              part_sizes=[cell.step_output_size, *cell.state_widths],
                              state_count=len(cell.state_widths))
        return self._traced_keras_cell(planned, output_shape, return_sequences, return_state,
                                       (edits or {}).get(planned.traced_name))

    def _traced_keras_cell(self, planned, output_shape, return_sequences, return_state, edits):
        """A TracedRNN over the traced twin of a Keras cell, rebuilt from the cell's config."""
        layer, kind = planned.layer, planned.kind
        (exposed,) = planned.cells
        quantities = exposed.quantities
        extras = tuple(q for q in quantities if q != "h")
        cell_config, traced_config = {}, {}
        if kind.split_outputs:
            cell_config["split_outputs"] = not layer.unroll
        if kind.spatial:
            state_shape = conv_state_shape(layer, output_shape)
            cell_config.update(rank=layer.cell.rank, state_shape=list(state_shape))
            traced_config.update(part_shapes=[state_shape] * (1 + len(extras)),
                                 state_shapes=[state_shape] * len(kind.state_index))
        if edits:
            cell_config.update(edits=edits["edits"], input_width=edits["input_width"])
            traced_config["edit_channels"] = edits["channels"]
        traced_cell = getattr(self.backend, kind.traced_cell)
        cell = traced_cell.from_config({**layer.cell.get_config(), **cell_config, "extras": list(extras)})
        return self._wrap(planned, cell, return_sequences, return_state, extras=extras, exposed=quantities,
                          state_index=kind.state_index, **traced_config)

    def _traced_copy(self, exposed):
        """The traced cell that runs a copy of a custom cell and emits its states."""
        backend = self.backend
        return getattr(backend, exposed.kind.traced_cell)(
            copy_cell(exposed.cell), name=f"traced_{exposed.cell.name}", dtype=backend.dtype_policy(exposed.cell))

    def _traced_stack(self, planned, return_sequences, return_state):
        """A TracedRNN over the traced stack of an RNN(StackedRNNCells([...])), each cell traced by its kind."""
        backend, layer = self.backend, planned.layer
        cells, extras, exposed_names, sizes, state_index, offset = [], [], [], [], {}, 0
        for exposed in planned.cells:
            kind = exposed.kind
            if kind.copies_cell:
                cell = self._traced_copy(exposed)
                emitted, widths = cell.extras, cell.state_widths
            else:
                # Each stacked cell emits what it exposes (h too: the stack's output is the last cell's).
                traced_cell = getattr(backend, kind.traced_cell)
                cell = traced_cell.from_config({**exposed.cell.get_config(), "extras": list(exposed.quantities)})
                emitted, widths = exposed.quantities, [int(exposed.cell.units)] * len(exposed.quantities)
            cells.append(cell)
            extras += [f"{exposed.suffix}.{q}" for q in emitted]
            sizes += widths
            exposed_names += [f"{exposed.suffix}.{q}" for q in exposed.quantities]
            state_index.update({f"{exposed.suffix}.{q}": offset + k for q, k in kind.state_index.items()})
            offset += len(flat_state_sizes(exposed.cell.state_size))
        stack = getattr(backend, planned.kind.traced_cell)(cells, name=layer.cell.name,
                                                           dtype=backend.dtype_policy(layer.cell))
        return self._wrap(planned, stack, return_sequences, return_state, extras=extras, exposed=exposed_names,
                          state_index=state_index, output_alias=None,
                          part_sizes=[stack.step_output_size] + sizes, state_count=offset)

    def _wrap(self, planned, cell, return_sequences, return_state, **traced_config):
        backend, layer = self.backend, planned.layer
        if planned.subclass is not None:
            traced_config["subclass"] = planned.subclass
        rnn = backend.InnerRNN(
            cell, return_sequences=True, return_state=True, go_backwards=layer.go_backwards,
            stateful=layer.stateful, unroll=layer.unroll, zero_output_for_mask=False, name="rnn",
            dtype=backend.dtype_policy(layer),
        )
        traced_class = backend.TracedRNN if planned.subclass is None else backend.TracedSubclassRNN
        return traced_class(
            rnn,
            return_sequences=layer.return_sequences if return_sequences is None else return_sequences,
            return_state=layer.return_state if return_state is None else return_state,
            zero_output_for_mask=backend.zeroes_masked_output(layer),
            expose_mask=self.expose_masks, name=planned.traced_name, dtype=backend.dtype_policy(layer),
            **traced_config,
        )


def _reconstructed(builder, planned, return_sequences, return_state):
    """The ``"reconstruct"`` fast path: a ReconstructedLSTM, or None where it declines the layer
    (`lstm_rewrite.layers.reconstructed.unsupported_reason`, or a subclass running its own call)."""
    layer = planned.layer
    if reconstructed.unsupported_reason(layer) is not None or planned.subclass is not None:
        return None
    return reconstructed.reconstructed_lstm(
        builder.backend, layer, planned.traced_name, planned.cells[0].quantities,
        expose_mask=builder.expose_masks,
        return_sequences=layer.return_sequences if return_sequences is None else return_sequences,
        return_state=layer.return_state if return_state is None else return_state,
        dtype=builder.backend.dtype_policy(layer),
    )


# The fast paths a kind may name (`RecurrentKind.fast_path`), each of which may decline a layer.
_FAST_PATHS = {"reconstruct": _reconstructed}


def conv_state_shape(layer, output_shape) -> tuple:
    """One state's shape (no batch axis) of a ConvLSTM call whose first output has ``output_shape``.

    Example:
        >>> conv_state_shape(conv_lstm_2d, (None, 5, 8, 8, 4))   # channels_last, 4 filters
        (8, 8, 4)
    """
    cell = layer.cell
    rank = int(cell.rank)
    if cell.data_format == "channels_first":
        return (int(cell.filters),) + tuple(int(d) for d in output_shape[-rank:])
    return tuple(int(d) for d in output_shape[-(rank + 1):-1]) + (int(cell.filters),)
